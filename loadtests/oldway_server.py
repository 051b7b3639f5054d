"""The old way, for comparison: every append is one synchronous PostgreSQL transaction.

This is how the product's backend wrote chat messages before tierproxy: the request waits
for PostgreSQL. On each `POST /v1/threads/{tid}/messages` it runs one asyncpg transaction
that bumps the thread's `last_seq` and INSERTs the message with that seq, then answers 201
with the same fields as the sidecar. `--sleep-ms 20` adds `SELECT pg_sleep(0.02)` at the start
of that transaction: a PostgreSQL that takes 20 ms per transaction, standing in for the loaded
production database of the product's past (which took 500 ms and more).

    python loadtests/oldway_server.py --port 8770 --postgres-url postgresql://... \\
        --schema oldway --sleep-ms 0

Its tables have the columns and keys of tierproxy's own, in their own schema (dropped and
created at startup). The pool has asyncpg's default size (10 connections), as a backend
would; `PUT /v1/threads/{tid}` creates a thread, so the bench prepares threads the same way
for every target. Same HTTP stack as the sidecar and the bare server: aiohttp on uvloop,
orjson, no access log.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import uvloop
from aiohttp import web

POOL = web.AppKey("pool", asyncpg.Pool)
SLEEP_S = web.AppKey("sleep_s", float)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_IDS = itertools.count()
_SCHEMA = """
DROP SCHEMA IF EXISTS {schema} CASCADE;
CREATE SCHEMA {schema};
CREATE TABLE {schema}.threads (
    thread_id text PRIMARY KEY, title text NOT NULL DEFAULT '',
    owner_id text NOT NULL DEFAULT '', metadata jsonb NOT NULL DEFAULT '{{}}',
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    version bigint NOT NULL DEFAULT 1, last_seq bigint NOT NULL DEFAULT 0,
    deleted boolean NOT NULL DEFAULT false);
CREATE TABLE {schema}.messages (
    message_id text NOT NULL, thread_id text NOT NULL, seq bigint NOT NULL,
    role text NOT NULL, content text NOT NULL, metadata jsonb NOT NULL DEFAULT '{{}}',
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    version bigint NOT NULL, deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (thread_id, message_id), UNIQUE (thread_id, seq));
"""
_BUMP = """UPDATE threads SET last_seq = last_seq + 1, updated_at = $2
           WHERE thread_id = $1 RETURNING last_seq"""
_INSERT = """INSERT INTO messages (message_id, thread_id, seq, role, content, metadata,
                                   created_at, updated_at, version)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $7, 1)"""
_PUT_THREAD = """INSERT INTO threads (thread_id, title) VALUES ($1, $2)
                 ON CONFLICT (thread_id) DO NOTHING"""


def _json(status: int, doc: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _new_id() -> str:
    return f"{time.time_ns():x}{os.getpid():x}{next(_IDS):x}"


async def append(request: web.Request) -> web.Response:
    tid = request.match_info["tid"]
    body = orjson.loads(await request.read())
    mid = body.get("message_id") or _new_id()
    now = datetime.now(UTC)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        if request.app[SLEEP_S]:
            await conn.execute("SELECT pg_sleep($1)", request.app[SLEEP_S])
        seq = await conn.fetchval(_BUMP, tid, now)
        if seq is None:
            return _json(404, {"error": {"code": "not_found", "message": f"thread {tid}"}})
        await conn.execute(_INSERT, mid, tid, seq, body.get("role", "user"),
                           body.get("content", ""), orjson.dumps(body.get("metadata", {})).decode(),
                           now)
    return _json(201, {"message_id": mid, "thread_id": tid, "seq": seq, "version": 1})


async def put_thread(request: web.Request) -> web.Response:
    tid = request.match_info["tid"]
    body = orjson.loads(await request.read() or b"{}")
    status = await request.app[POOL].execute(_PUT_THREAD, tid, body.get("title", ""))
    return _json(201 if status.endswith(" 1") else 200, {"thread_id": tid})


async def ready(request: web.Request) -> web.Response:
    return _json(200, {"ready": True})


def create_app(postgres_url: str, schema: str, sleep_ms: float) -> web.Application:
    async def pool(app: web.Application) -> Any:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(_SCHEMA.format(schema=schema))
        finally:
            await conn.close()
        app[POOL] = await asyncpg.create_pool(postgres_url,
                                              server_settings={"search_path": schema})
        yield
        await app[POOL].close()

    app = web.Application()
    app[SLEEP_S] = sleep_ms / 1000
    app.cleanup_ctx.append(pool)
    app.router.add_get("/readyz", ready, allow_head=False)
    app.router.add_put("/v1/threads/{tid}", put_thread)
    app.router.add_post("/v1/threads/{tid}/messages", append)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--schema", default="oldway", help="created (replaced) at startup")
    parser.add_argument("--sleep-ms", type=float, default=0.0,
                        help="pg_sleep at the start of every append's transaction")
    args = parser.parse_args()
    if not _SCHEMA_NAME.fullmatch(args.schema):
        parser.error(f"--schema {args.schema!r}: lower-case letters, digits and _ only")
    uvloop.install()
    web.run_app(create_app(args.postgres_url, args.schema, args.sleep_ms), host=args.host,
                port=args.port, access_log=None, print=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
