"""The statements of a flush: set-based upserts (one parameter per column, so no limit on
rows), each guarded by the version so replays never duplicate or regress."""

from __future__ import annotations

UPSERT_THREADS = """
INSERT INTO threads AS t (thread_id, title, owner_id, metadata, created_at, updated_at,
                          version, deleted)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]::jsonb[],
                     $5::timestamptz[], $6::timestamptz[], $7::bigint[], $8::bool[])
ON CONFLICT (thread_id) DO UPDATE SET
    title = excluded.title, owner_id = excluded.owner_id, metadata = excluded.metadata,
    created_at = excluded.created_at, updated_at = excluded.updated_at,
    version = excluded.version, deleted = excluded.deleted
WHERE excluded.version > t.version
"""

# A message's thread row may not be flushed yet: a version-0 placeholder holds last_seq and
# loses to the thread's first real version.
BUMP_LAST_SEQ = """
INSERT INTO threads AS t (thread_id, version, last_seq)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
ON CONFLICT (thread_id) DO UPDATE SET last_seq = excluded.last_seq
WHERE excluded.last_seq > t.last_seq
"""

# Message ids are scoped by thread, as in the API (/v1/threads/{tid}/messages/{mid}).
UPSERT_MESSAGES = """
INSERT INTO messages AS m (message_id, thread_id, seq, role, content, metadata, created_at,
                           updated_at, version, deleted, fingerprint)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                     $6::text[]::jsonb[], $7::timestamptz[], $8::timestamptz[], $9::bigint[],
                     $10::bool[], $11::text[])
ON CONFLICT (thread_id, message_id) DO UPDATE SET
    role = excluded.role, content = excluded.content, metadata = excluded.metadata,
    updated_at = excluded.updated_at, version = excluded.version, deleted = excluded.deleted,
    fingerprint = coalesce(m.fingerprint, excluded.fingerprint)
WHERE excluded.version > m.version
"""

UPSERT_STATE = """
INSERT INTO state_entries AS s (key, value, version, expires_at, updated_at, deleted)
SELECT * FROM unnest($1::text[], $2::text[]::jsonb[], $3::bigint[], $4::timestamptz[],
                     $5::timestamptz[], $6::bool[])
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
    updated_at = excluded.updated_at, deleted = excluded.deleted
WHERE excluded.version > s.version
"""

# Rows a batch skipped because PostgreSQL already holds their version — with other content.
# A replay skips the same content; other content at an equal version means a version was
# handed out twice (a bug or a Redis that lost data): never silently dropped, counted.
CONFLICTS = {
    "threads": """
SELECT x.id FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]::jsonb[], $5::bigint[],
                        $6::bool[]) AS x(id, title, owner_id, metadata, version, deleted)
JOIN threads t ON t.thread_id = x.id AND t.version = x.version
WHERE (t.title, t.owner_id, t.metadata, t.deleted)
      IS DISTINCT FROM (x.title, x.owner_id, x.metadata, x.deleted)
""",
    "messages": """
SELECT x.tid || '/' || x.id FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                        $5::text[]::jsonb[], $6::bigint[], $7::bool[])
    AS x(id, tid, role, content, metadata, version, deleted)
JOIN messages m ON m.thread_id = x.tid AND m.message_id = x.id AND m.version = x.version
WHERE (m.role, m.content, m.metadata, m.deleted)
      IS DISTINCT FROM (x.role, x.content, x.metadata, x.deleted)
""",
    "state_entries": """
SELECT x.id FROM unnest($1::text[], $2::text[]::jsonb[], $3::bigint[], $4::bool[])
    AS x(id, value, version, deleted)
JOIN state_entries s ON s.key = x.id AND s.version = x.version
WHERE (s.value, s.deleted) IS DISTINCT FROM (x.value, x.deleted)
""",
}

