"""Schemathesis (issue 11.5, FAULTS.md scenario 22) against the /openapi.json a real sidecar
serves with a token set: every check, the stateful phase following the document's links,
seeded and bounded. Holds: no failure (so no 5xx: not_a_server_error is one of the checks),
and a rejected request leaves no trace: no answer of 400 or more comes with an entry appended
to a write-behind log (every write appends one, in the script that stores it, and PostgreSQL
and ClickHouse are fed from the log alone); a run of invalid requests alone changes no Redis
key and no PostgreSQL or ClickHouse row.

The CLI runs in a subprocess against the app's URL (aiohttp is neither ASGI nor WSGI), so this
test's event loop keeps serving while it runs. On a failure the assertion shows schemathesis'
report, each failure with a curl line that reproduces it."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import keys, openapi
from proxy.app import create_app
from proxy.backends import clickhouse
from proxy.backends.clickhouse import ClickHouseStore
from proxy.settings import Settings
from tests import helpers
from tests.conftest import Servers, make_settings

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
THREAD, MESSAGE = "st-thread", "st-message"  # made by the test before a run
CLI = Path(sys.executable).parent / "schemathesis"
RUN_TIMEOUT_S = 90.0  # each run takes far less; a hang fails instead of stalling the suite

# The run's configuration (schemathesis.toml). What is not named here is schemathesis'
# default: every check, every phase the run's --phases names.
CONFIG = f"""
seed = 11
workers = 1                   # one request at a time: a run repeats from its seed, and the
                              # write probe tells which request appended what
continue-on-failure = true    # report every failure, not only the first of an operation
request-timeout = 10.0

[cache]
enabled = false               # no failures of an earlier run replayed first

[generation]
max-examples = 12
database = "none"             # no .hypothesis directory: the seed makes runs repeatable
unique-inputs = true          # an input is sent once per run (see the stateful tests)

[auth.openapi.bearer]
bearer = "{TOKEN}"

[checks]
max_response_time = 5.0       # generous (the machine is shared): catches a hang, not slowness

# A schema-valid request may still fail on state: 412 answers an If-Match naming a version the
# entity is not at, as 404 (unknown) and 409 (deleted) answer other states, which schemathesis
# already allows valid data. The rest of the list is its default.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

[phases.stateful]
max-steps = 12

# Only the document's links, no guessed ones: a guess such as "append a message with an id an
# answer carried" is a retry once that message is deleted, answered 200 with the tombstone,
# which ensure_resource_availability takes for a creation whose read (404) then fails.
[phases.stateful.inference]
algorithms = []

# /metrics is served on the metrics port, by another app than the one under test.
[[operations]]
include-operation-id = "metrics"
enabled = false

# An HTTP client cannot open a WebSocket: every valid request it sends lacks the handshake and
# is answered 400, as documented (the socket itself: tests/test_ws.py).
[[operations]]
include-operation-id = "webSocket"
checks.positive_data_acceptance.expected-statuses = ["400"]

# A schema-valid read-marker seq past the thread's last_seq is refused on state (422), which the
# document cannot state (issue 12.2); the rest is the list above.
[[operations]]
include-operation-id = "putReadMarker"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "412", "422", "429", "5xx"]
"""

# An undeclared header is no invalid request (RFC 9110: a recipient ignores unknown fields), so
# a negative case whose only fault is one may rightly write. These runs make none, nor
# undeclared query or body fields (test_openapi.py's samples check those against model.py).
DECLARED_ONLY = """
[phases.coverage.generation]
allow-extra-parameters = false

[phases.fuzzing.generation]
allow-extra-parameters = false
"""


def pinned(op_id: str, **params: str) -> str:
    """An operation whose parameters (`path_tid`: path parameter tid) have fixed values, e.g.
    naming what the test made, so its requests reach an existing thread or message instead of
    a drawn id that is not there (404)."""
    values = ", ".join(f'"{name.replace("_", ".", 1)}" = "{value}"'
                       for name, value in params.items())
    return f'\n[[operations]]\ninclude-operation-id = "{op_id}"\nparameters = {{ {values} }}\n'


def disabled(op_id: str) -> str:
    return f'\n[[operations]]\ninclude-operation-id = "{op_id}"\nenabled = false\n'


# Operations no link leads to or from, left out of the stateful chains: a POST could start one.
NO_LINKS = disabled("publishEvent")


class WriteProbe:
    """The outermost middleware of the app under test: notes every request answered 400 or
    more during which an entry was appended to a write-behind log (its last id moved)."""

    def __init__(self, redis: aioredis.Redis, shards: int) -> None:
        self._redis, self._logs = redis, [keys.log(s) for s in range(shards)]
        self.violations: list[str] = []

    async def _last_ids(self) -> list[Any]:
        return [(await self._redis.xinfo_stream(log))["last-generated-id"]
                for log in self._logs]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        before = await self._last_ids()
        resp: web.StreamResponse = await handler(request)
        if resp.status >= 400 and await self._last_ids() != before:
            self.violations.append(f"{request.method} {request.path_qs} -> {resp.status}")
        return resp


async def started(aiohttp_client: Any, redis: aioredis.Redis,
                  settings: Settings) -> tuple[TestClient[Any, Any], WriteProbe]:
    """The app behind the probe, serving the document of its settings (which declares the
    bearer token because one is set, and the configured content limit), with the thread and
    message that pinned operations name."""
    app = create_app(settings)
    probe = WriteProbe(redis, settings.redis.shards)
    app.middlewares.insert(0, probe.middleware)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    served = orjson.loads(await (await client.get("/openapi.json")).read())
    assert served == openapi.document(settings), "/openapi.json is not the document of the " \
        "app's settings (bearer security, limits): app.py should serve openapi.document(settings)"
    resp = await client.put(f"/v1/threads/{THREAD}", json={}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    resp = await client.post(f"/v1/threads/{THREAD}/messages", headers=AUTH,
                             json={"message_id": MESSAGE, "role": "user", "content": "hi"})
    assert resp.status == 201, await resp.text()
    return client, probe


async def schemathesis(client: TestClient[Any, Any], probe: WriteProbe, work: Path,
                       config: str, *args: str) -> str:
    """Run the CLI against the app; its report is the assertion message if anything failed."""
    path = work / "schemathesis.toml"
    path.write_text(CONFIG + config)
    base = str(client.make_url("")).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        str(CLI), "--config-file", str(path), "run", f"{base}/openapi.json", "--url", base,
        "--no-color", *args, cwd=work,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, f"schemathesis {' '.join(args)} failed:\n{report}"
    assert not probe.violations, f"rejected requests that wrote: {probe.violations}"
    return report


def links_followed(report: str) -> int:
    """How many of the document's links the stateful phase followed (0: it never got going)."""
    found = re.search(r"API Links:\s+(\d+) covered", report)
    assert found, report
    return int(found[1])


def guarded(servers: Servers) -> Settings:
    # A small content limit keeps generation cheap: schemathesis draws strings up to, and in
    # the negative phase just past, the maxLength the document states.
    return make_settings(servers, api={"token": TOKEN, "max_content_chars": 256})


async def test_the_probe_sees_a_rejected_request_that_writes(aiohttp_client: Any,
                                                            redis: aioredis.Redis,
                                                            pg: asyncpg.Connection,
                                                            servers: Servers) -> None:
    """The probe can fail: of a refusal without a log entry, a write with one, and a refusal
    with one, only the last is noted."""
    settings = guarded(servers)
    _, probe = await started(aiohttp_client, redis, settings)  # the log streams exist
    log = keys.log(settings.redis.shards - 1)

    async def answer(request: web.Request) -> web.Response:
        if request.query.get("append"):
            await redis.xadd(log, {"probe": "1"})
        return web.Response(status=int(request.query["status"]))

    app = web.Application(middlewares=[probe.middleware])
    app.router.add_put("/x", answer)
    client = await aiohttp_client(app)
    for query in ("status=409", "status=201&append=1", "status=409&append=1"):
        await client.put(f"/x?{query}")
    assert probe.violations == ["PUT /x?status=409&append=1 -> 409"]


async def stored_rows(pg: asyncpg.Connection, ch: ClickHouseStore) -> dict[str, int]:
    counts = {table: await pg.fetchval(f"SELECT count(*) FROM {table}")
              for table in ("threads", "messages", "state_entries")}
    rows = await ch.query(f"SELECT count() AS n FROM {clickhouse.TABLE}", {})
    return {**counts, "clickhouse": int(rows[0]["n"])}


async def test_invalid_requests_are_rejected_and_leave_no_trace(
        aiohttp_client: Any, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, ch: ClickHouseStore, tmp_path: Path) -> None:
    """Invalid data only: every request must be rejected (negative_data_rejection, among all
    the checks). Appends, edits and deletes go to a thread and message that exist, so one that
    slipped through would write rather than answer 404. Afterwards no Redis key has changed (a
    log stream keeps its last appended id even once flushed and trimmed) and PostgreSQL and
    ClickHouse hold the rows they held. A valid write at the end shows the dump sees one."""
    client, probe = await started(aiohttp_client, redis, guarded(servers))
    made = {"threads": 1, "messages": 1, "state_entries": 0, "clickhouse": 2}  # 2 events

    async def flushed() -> bool:
        return await stored_rows(pg, ch) == made

    await helpers.wait_for(flushed)
    pins = (pinned("appendMessage", path_tid=THREAD)
            + pinned("patchMessage", path_tid=THREAD, path_mid=MESSAGE)
            + pinned("deleteMessage", path_tid=THREAD, path_mid=MESSAGE))
    async with helpers.unchanged(redis) as before:
        await schemathesis(client, probe, tmp_path, DECLARED_ONLY + pins, "--mode", "negative",
                           "--phases", "examples,coverage,fuzzing")
    assert await stored_rows(pg, ch) == made
    resp = await client.put("/v1/state/probe", json={"value": 1}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert await helpers.dump_redis(redis) != before


async def test_every_check_passes(aiohttp_client: Any, servers: Servers,
                                  redis: aioredis.Redis, pg: asyncpg.Connection,
                                  tmp_path: Path) -> None:
    """Valid and invalid data through the examples, coverage and fuzzing phases (here an
    invalid case breaks one part of a request and keeps the rest valid, so that part alone
    must be refused); appends go to the test's thread, so they are stored, replayed (same id
    and body: 200) or refused (409)."""
    client, probe = await started(aiohttp_client, redis, guarded(servers))
    await schemathesis(client, probe, tmp_path,
                       DECLARED_ONLY + pinned("appendMessage", path_tid=THREAD)
                       + pinned("publishEvent", path_tid=THREAD),  # published: 202 (or 429)
                       "--mode", "all", "--phases", "examples,coverage,fuzzing")


async def test_stateful_chains_of_messages(aiohttp_client: Any, servers: Servers,
                                           redis: aioredis.Redis, pg: asyncpg.Connection,
                                           tmp_path: Path) -> None:
    """Chains start at appends (schemathesis starts them at POSTs), to the test's thread: read,
    edit and delete each message by the id answered, at the version answered; list the thread.
    Every scenario shares that thread, so appends carry one X-Durability: with unique inputs,
    no scenario then repeats the append of another, which would be a retry, answered 200 with
    the tombstone if that one was deleted since (ensure_resource_availability only looks for
    the delete in its own scenario)."""
    client, probe = await started(aiohttp_client, redis, guarded(servers))
    pin = pinned("appendMessage", path_tid=THREAD, **{"header_X-Durability": "acknowledged"})
    report = await schemathesis(client, probe, tmp_path, pin + NO_LINKS, "--mode", "positive",
                                "--phases", "stateful")
    assert links_followed(report) >= 5, report


async def test_stateful_chains_of_threads_and_state_entries(
        aiohttp_client: Any, servers: Servers, redis: aioredis.Redis, pg: asyncpg.Connection,
        tmp_path: Path) -> None:
    """Without appends the chains start at PUTs: put a thread, read, replace, list and delete
    it at the version answered, read it again (404); the same for state entries."""
    client, probe = await started(aiohttp_client, redis, guarded(servers))
    report = await schemathesis(client, probe, tmp_path, disabled("appendMessage") + NO_LINKS,
                                "--mode", "positive", "--phases", "stateful")
    assert links_followed(report) >= 5, report
