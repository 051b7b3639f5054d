"""The statements of a flush. A batch is first staged: one binary COPY of its docs, as the log
holds them, into a temporary table of the connection (emptied at every commit); then one
INSERT ... SELECT per table takes the columns out of the docs. PostgreSQL parses the JSON, so
the sidecar decodes nothing; each upsert is guarded by the version, so replays never
duplicate or regress."""

from __future__ import annotations

STAGE = "flush_batch"
CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE} (kind text NOT NULL, doc jsonb NOT NULL,
                                         fingerprint text) ON COMMIT DELETE ROWS
"""

# Each table's rows out of the staged docs of its kind. A field a doc lacks comes out NULL:
# the NOT NULL columns refuse it, as they refuse a wrong type (the entry is poison).
_THREADS = f"""
SELECT doc->>'thread_id' AS thread_id, doc->>'title' AS title, doc->>'owner_id' AS owner_id,
       doc->'metadata' AS metadata, (doc->>'created_at')::timestamptz AS created_at,
       (doc->>'updated_at')::timestamptz AS updated_at, (doc->>'version')::bigint AS version,
       (doc->>'deleted')::bool AS deleted,
       (doc->>'updated_at')::timestamptz AS last_activity_at,  -- inbox: a change is activity
       coalesce((doc->>'cseq')::bigint, 0) AS cseq
FROM {STAGE} WHERE kind = 't'"""
_MESSAGES = f"""
SELECT doc->>'message_id' AS message_id, doc->>'thread_id' AS thread_id,
       (doc->>'seq')::bigint AS seq, doc->>'role' AS role, doc->>'content' AS content,
       doc->'metadata' AS metadata, (doc->>'created_at')::timestamptz AS created_at,
       (doc->>'updated_at')::timestamptz AS updated_at, (doc->>'version')::bigint AS version,
       (doc->>'deleted')::bool AS deleted, fingerprint,
       coalesce((doc->>'cseq')::bigint, 0) AS cseq
FROM {STAGE} WHERE kind = 'm'"""
_STATE = f"""
SELECT doc->>'key' AS key,
       CASE WHEN (doc->>'deleted')::bool THEN NULL ELSE doc->'value' END AS value,
       (doc->>'version')::bigint AS version, (doc->>'expires_at')::timestamptz AS expires_at,
       (doc->>'updated_at')::timestamptz AS updated_at, (doc->>'deleted')::bool AS deleted
FROM {STAGE} WHERE kind = 's'"""

# Each upsert answers how many rows it wrote (fewer than staged: replays, or conflicts).
UPSERT_THREADS = f"""
WITH written AS (
    INSERT INTO threads AS t (thread_id, title, owner_id, metadata, created_at, updated_at,
                              version, deleted, last_activity_at, cseq, last_cseq)
    SELECT x.*, x.cseq FROM ({_THREADS}) x
    ON CONFLICT (thread_id) DO UPDATE SET
        title = excluded.title, owner_id = excluded.owner_id, metadata = excluded.metadata,
        created_at = excluded.created_at, updated_at = excluded.updated_at,
        version = excluded.version, deleted = excluded.deleted,
        last_activity_at = greatest(t.last_activity_at, excluded.last_activity_at),
        cseq = excluded.cseq, last_cseq = greatest(t.last_cseq, excluded.last_cseq)
    WHERE excluded.version > t.version AND (excluded.deleted OR NOT t.deleted)
    RETURNING 1)
SELECT count(*) FROM written
"""

# Message ids are scoped by thread, as in the API (/v1/threads/{tid}/messages/{mid}). The
# same statement raises each thread's last_seq, last_cseq (and last activity); a message's
# thread row may not be flushed yet: a version-0 placeholder holds them and loses to the
# thread's first real version.
UPSERT_MESSAGES = f"""
WITH staged AS MATERIALIZED ({_MESSAGES}),
written AS (
    INSERT INTO messages AS m (message_id, thread_id, seq, role, content, metadata,
                               created_at, updated_at, version, deleted, fingerprint, cseq)
    SELECT * FROM staged
    ON CONFLICT (thread_id, message_id) DO UPDATE SET
        role = excluded.role, content = excluded.content, metadata = excluded.metadata,
        updated_at = excluded.updated_at, version = excluded.version,
        deleted = excluded.deleted, fingerprint = coalesce(m.fingerprint, excluded.fingerprint),
        cseq = excluded.cseq
    WHERE excluded.version > m.version AND (excluded.deleted OR NOT m.deleted)
    RETURNING 1),
last_seqs AS (
    -- inbox: the thread's last activity moves to its newest message (never backwards)
    INSERT INTO threads AS t (thread_id, version, last_seq, last_activity_at, last_cseq)
    SELECT thread_id, 0, max(seq), max(created_at), max(cseq) FROM staged GROUP BY thread_id
    ORDER BY thread_id
    ON CONFLICT (thread_id) DO UPDATE SET last_seq = greatest(t.last_seq, excluded.last_seq),
        last_activity_at = greatest(t.last_activity_at, excluded.last_activity_at),
        last_cseq = greatest(t.last_cseq, excluded.last_cseq)
    WHERE excluded.last_seq > t.last_seq OR excluded.last_activity_at > t.last_activity_at
        OR excluded.last_cseq > t.last_cseq)
SELECT count(*) FROM written
"""

UPSERT_STATE = f"""
WITH written AS (
    INSERT INTO state_entries AS s (key, value, version, expires_at, updated_at, deleted)
    {_STATE}
    ON CONFLICT (key) DO UPDATE SET
        value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
        updated_at = excluded.updated_at, deleted = excluded.deleted
    WHERE excluded.version > s.version
    RETURNING 1)
SELECT count(*) FROM written
"""

# Read markers (issue 12.2) only move forward: the highest seq wins, an equal one is a replay.
UPSERT_MARKERS = f"""
WITH written AS (
    INSERT INTO read_markers AS r (thread_id, user_id, seq, updated_at)
    SELECT doc->>'thread_id', doc->>'user_id', (doc->>'seq')::bigint,
           (doc->>'updated_at')::timestamptz
    FROM {STAGE} WHERE kind = 'r'
    ON CONFLICT (thread_id, user_id) DO UPDATE SET
        seq = excluded.seq, updated_at = excluded.updated_at
    WHERE excluded.seq > r.seq
    RETURNING 1)
SELECT count(*) FROM written
"""

# Staged rows skipped because PostgreSQL already holds their version — with other content —
# or a tombstone below it. A replay skips the same content; other content at an equal version
# means a version was handed out twice (a bug or a Redis that lost data). A thread or message
# tombstone is final (the API never revives one): a live version above it is a change Redis
# acknowledged and had not flushed when the entity was deleted or erased through PostgreSQL
# while Redis was down (proxy.failover); it must not bring the content back. Never silently
# dropped, counted.
CONFLICTS = {
    "threads": f"""
SELECT x.thread_id FROM ({_THREADS}) x
JOIN threads t ON t.thread_id = x.thread_id
              AND (t.version = x.version OR (t.deleted AND t.version < x.version))
WHERE (t.title, t.owner_id, t.metadata, t.deleted)
      IS DISTINCT FROM (x.title, x.owner_id, x.metadata, x.deleted)
""",
    "messages": f"""
SELECT x.thread_id || '/' || x.message_id FROM ({_MESSAGES}) x
JOIN messages m ON m.thread_id = x.thread_id AND m.message_id = x.message_id
               AND (m.version = x.version OR (m.deleted AND m.version < x.version))
WHERE (m.role, m.content, m.metadata, m.deleted)
      IS DISTINCT FROM (x.role, x.content, x.metadata, x.deleted)
""",
    "state_entries": f"""
SELECT x.key FROM ({_STATE}) x
JOIN state_entries s ON s.key = x.key AND s.version = x.version
WHERE (s.value, s.deleted) IS DISTINCT FROM (x.value, x.deleted)
""",
}

# Erasures (issue 12.4), after the batch's upserts in its transaction: $1 thread ids, $2 message
# ids ('' = the whole thread). The tombstones already blank what they replace; this also
# blanks every message of an erased thread (PostgreSQL may hold more than Redis) and a row
# that kept its version (an equal-version replay), and drops the write-through log's copies.
ERASE = """
WITH erased AS (SELECT * FROM unnest($1::text[], $2::text[]) AS x(tid, mid)),
blanked AS (
    UPDATE messages m SET content = '', metadata = '{}' FROM erased e
    WHERE m.thread_id = e.tid AND (e.mid = '' OR m.message_id = e.mid)
      AND (m.content <> '' OR m.metadata <> '{}'::jsonb)
    RETURNING 1)
DELETE FROM write_through_events w USING erased e
WHERE w.fields->>'k' IN ('t', 'm') AND w.fields->>'tid' = e.tid
  AND (e.mid = '' OR (w.fields->>'k' = 'm' AND w.fields->>'id' = e.mid))
"""

# A staged message new to PostgreSQL whose seq another message holds there: written through
# while Redis was down (FAULTS.md 7 and 30), or handed out again by a Redis that lost data. It
# moves to the end of its thread, seq and cseq after the highest PostgreSQL and the batch hold,
# under the thread's row lock (write-through's appends take turns on it too), rather than
# failing into dead letters: the write was acknowledged. Run only after such a collision.
RESEQUENCE = f"""
WITH taken AS (
    SELECT s.doc->>'thread_id' AS tid, s.doc->>'message_id' AS mid,
           row_number() OVER (PARTITION BY s.doc->>'thread_id'
                              ORDER BY (s.doc->>'seq')::bigint) AS n
    FROM {STAGE} s
    WHERE s.kind = 'm'
      AND EXISTS (SELECT 1 FROM messages m WHERE m.thread_id = s.doc->>'thread_id'
                  AND m.seq = (s.doc->>'seq')::bigint AND m.message_id <> s.doc->>'message_id')
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.thread_id = s.doc->>'thread_id'
                      AND m.message_id = s.doc->>'message_id')),
stored AS (
    SELECT t.thread_id AS tid,
           greatest(t.last_seq, (SELECT coalesce(max(seq), 0) FROM messages
                                 WHERE thread_id = t.thread_id)) AS seq,
           greatest(t.last_cseq, t.cseq, (SELECT coalesce(max(cseq), 0) FROM messages
                                          WHERE thread_id = t.thread_id)) AS cseq
    FROM threads t WHERE t.thread_id IN (SELECT tid FROM taken)
    ORDER BY t.thread_id FOR UPDATE),
batch AS (
    SELECT doc->>'thread_id' AS tid, max((doc->>'seq')::bigint) AS seq,
           max(coalesce((doc->>'cseq')::bigint, 0)) AS cseq
    FROM {STAGE} WHERE kind IN ('t', 'm') GROUP BY 1)
UPDATE {STAGE} s SET doc = s.doc || jsonb_build_object(
        'seq', greatest(coalesce(st.seq, 0), coalesce(b.seq, 0)) + x.n,
        'cseq', greatest(coalesce(st.cseq, 0), b.cseq) + x.n)
FROM taken x JOIN batch b ON b.tid = x.tid LEFT JOIN stored st ON st.tid = x.tid
WHERE s.kind = 'm' AND s.doc->>'thread_id' = x.tid AND s.doc->>'message_id' = x.mid
RETURNING x.tid, x.mid, (s.doc->>'seq')::bigint AS seq
"""

# A staged thread or message change whose change number (cseq) PostgreSQL holds for another
# change of the thread — written through while Redis was down, or handed out again by a Redis
# that lost data — takes the next number after the highest PostgreSQL and the batch hold, under
# the thread's row lock: the changes feed has one entry per number. Cheap when nothing
# collides: only a number at or below the thread's last_cseq is looked up. Run every flush,
# after RESEQUENCE (whose moves are past every number already).
MOVE_TAKEN_CSEQ = f"""
WITH taken AS (
    SELECT s.ctid AS at, t.thread_id AS tid,
           row_number() OVER (PARTITION BY t.thread_id
                              ORDER BY (s.doc->>'cseq')::bigint) AS n
    FROM {STAGE} s JOIN threads t ON t.thread_id = s.doc->>'thread_id'
    WHERE s.kind IN ('t', 'm') AND (s.doc->>'cseq')::bigint BETWEEN 1 AND t.last_cseq
      AND ((s.kind = 'm' AND t.cseq = (s.doc->>'cseq')::bigint)
           OR EXISTS (SELECT 1 FROM messages m WHERE m.thread_id = t.thread_id
                      AND m.cseq = (s.doc->>'cseq')::bigint
                      AND (s.kind = 't' OR m.message_id <> s.doc->>'message_id')))),
stored AS (
    SELECT t.thread_id AS tid,
           greatest(t.last_cseq, (SELECT coalesce(max(cseq), 0) FROM messages
                                  WHERE thread_id = t.thread_id)) AS cseq
    FROM threads t WHERE t.thread_id IN (SELECT tid FROM taken)
    ORDER BY t.thread_id FOR UPDATE),
batch AS (
    SELECT doc->>'thread_id' AS tid, max(coalesce((doc->>'cseq')::bigint, 0)) AS cseq
    FROM {STAGE} WHERE kind IN ('t', 'm') GROUP BY 1)
UPDATE {STAGE} s SET doc = s.doc || jsonb_build_object(
        'cseq', greatest(st.cseq, b.cseq) + x.n)
FROM taken x JOIN batch b ON b.tid = x.tid JOIN stored st ON st.tid = x.tid
WHERE s.ctid = x.at
RETURNING x.tid, coalesce(s.doc->>'message_id', ''), (s.doc->>'cseq')::bigint AS cseq
"""
