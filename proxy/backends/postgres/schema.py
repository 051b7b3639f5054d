"""The PostgreSQL schema: migrations applied in order, idempotently, one sidecar at a time."""

from __future__ import annotations

import logging

import asyncpg

logger = logging.getLogger(__name__)
LOCK_ID = 0x7469_6572  # advisory lock serialising migrations across sidecars ("tier")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS threads (
        thread_id text PRIMARY KEY,
        title text NOT NULL DEFAULT '',
        owner_id text NOT NULL DEFAULT '',
        metadata jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        version bigint NOT NULL,
        last_seq bigint NOT NULL DEFAULT 0,
        deleted boolean NOT NULL DEFAULT false
    );
    CREATE TABLE IF NOT EXISTS messages (
        message_id text NOT NULL,
        thread_id text NOT NULL,
        seq bigint NOT NULL,
        role text NOT NULL,
        content text NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        version bigint NOT NULL,
        deleted boolean NOT NULL DEFAULT false,
        PRIMARY KEY (thread_id, message_id),
        CONSTRAINT messages_thread_seq UNIQUE (thread_id, seq)
    );
    CREATE TABLE IF NOT EXISTS state_entries (
        key text PRIMARY KEY,
        value jsonb,
        version bigint NOT NULL,
        expires_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        deleted boolean NOT NULL DEFAULT false
    );
    """,
    # The fingerprint of the body a message was appended with, kept across edits: a retry of
    # the original append is recognized even after an edit (NULL: appended before this).
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS fingerprint text",
    # Changes made by write-through while Redis was down, as log entries: published to the
    # log for ClickHouse alone once Redis is back (PostgreSQL already has them).
    """
    CREATE TABLE IF NOT EXISTS write_through_events (
        id bigserial PRIMARY KEY,
        routing_id text NOT NULL,
        fields jsonb NOT NULL
    )
    """,
    # Read markers (issue 12.2): the seq up to which a user has read a thread, only raised.
    """
    CREATE TABLE IF NOT EXISTS read_markers (
        thread_id text NOT NULL,
        user_id text NOT NULL,
        seq bigint NOT NULL,
        updated_at timestamptz NOT NULL,
        PRIMARY KEY (thread_id, user_id)
    )
    """,
    # Inbox (GET /v1/threads?owner_id=): each thread's last activity, the later of its last
    # change and its last message, kept by the flush and by write-through; rows from before
    # this column are filled once from their messages.
    """
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema =
                       current_schema() AND table_name = 'threads'
                       AND column_name = 'last_activity_at') THEN
            ALTER TABLE threads ADD COLUMN last_activity_at timestamptz;
            UPDATE threads t SET last_activity_at = greatest(t.updated_at,
                (SELECT max(m.created_at) FROM messages m WHERE m.thread_id = t.thread_id));
            ALTER TABLE threads ALTER COLUMN last_activity_at SET DEFAULT now(),
                                ALTER COLUMN last_activity_at SET NOT NULL;
        END IF;
    END $$;
    CREATE INDEX IF NOT EXISTS threads_inbox
        ON threads (owner_id, last_activity_at DESC, thread_id DESC) WHERE NOT deleted;
    """,
    # Change numbers (the changes feed): a row's cseq is that of its latest change, a thread's
    # last_cseq the highest of it and its messages (raised by the flush). The feed below Redis
    # reads a thread's messages by cseq.
    """
    ALTER TABLE threads ADD COLUMN IF NOT EXISTS cseq bigint NOT NULL DEFAULT 0;
    ALTER TABLE threads ADD COLUMN IF NOT EXISTS last_cseq bigint NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN IF NOT EXISTS cseq bigint NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS messages_thread_cseq ON messages (thread_id, cseq);
    """,
    # Which API processes serve from PostgreSQL alone now (proxy.failover): none resumes
    # write-behind while another still writes through.
    """
    CREATE TABLE IF NOT EXISTS write_through_leases (
        holder text PRIMARY KEY,
        state text NOT NULL,  -- proxy.failover: down | up | held
        until timestamptz NOT NULL
    )
    """,
]

async def apply_migrations(conn: asyncpg.Connection) -> None:
    """Apply the schema idempotently, one sidecar at a time (advisory lock)."""
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_ID)
    try:
        for statement in MIGRATIONS:
            await conn.execute(statement)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_ID)
    logger.info("postgres schema is up to date (%d migrations)", len(MIGRATIONS))


async def migrate(url: str) -> None:
    """`tierproxy migrate`."""
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


