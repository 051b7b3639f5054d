"""Changes-feed resume: what a subscriber that was away gets back when it resubscribes with
after_cseq.

    python loadtests/changes_resume.py                     (1,000 creates, 500 edits, 250 deletes)
    python loadtests/changes_resume.py --creates 10000 --edits 5000 --deletes 2500

Starts embedded Redis + PostgreSQL and two sidecar subprocesses (harness.Stack). On sidecar A a
WebSocket subscribes to a thread with `after_cseq: 0`, reads until it has the thread's last
change, and disconnects. Sidecar B then makes the creates, edits and deletes (proxy.client,
16 at a time; edits and deletes hit the first created messages, so some are both). A new
socket on A resubscribes with `after_cseq` = the last cseq it had. Reported: `expected` (the
entities changed meanwhile, from GET /changes), `replayed` (change frames received until the
last cseq), `duplicates` (an entity sent twice), `missing` (an entity not sent at its latest
cseq), `out_of_order` (a cseq not above the previous one), `subscribed_ms` (subscribe sent →
its reply) and `catch_up_ms` (subscribe sent → the last change received). The socket is raw
aiohttp, not proxy.client's Subscription: the client drops repeated cseqs, and counting them
is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import aiohttp
import harness
import orjson
from harness import Sidecar

from proxy.client import Client

TID = "resume-1"
BEFORE = 10  # messages the first socket sees live before it goes away
CONCURRENCY = 16
DEADLINE_S = 120.0


def key(frame: dict[str, Any]) -> str:
    """The entity a change frame is about: the thread, or one of its messages."""
    return f"m:{frame['message']['message_id']}" if "message" in frame else "thread"


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive()
    if msg.type is not aiohttp.WSMsgType.TEXT:
        raise RuntimeError(f"the socket ended: {msg.type.name} {ws.close_code}")
    frame: dict[str, Any] = orjson.loads(msg.data)
    if frame.get("type") == "error":
        raise RuntimeError(f"error frame: {frame}")
    return frame


async def follow(session: aiohttp.ClientSession, a: Sidecar, after: int,
                 until: int) -> tuple[list[dict[str, Any]], float, float]:
    """Subscribe from `after` and read change frames until cseq `until`: the frames, ms to
    the subscribed reply, ms to the last frame. The socket is closed on return."""
    async with session.ws_connect(f"{a.url}/v1/ws") as ws, asyncio.timeout(DEADLINE_S):
        start = time.perf_counter()
        await ws.send_str(orjson.dumps({"op": "subscribe", "thread_id": TID,
                                        "after_cseq": after}).decode())
        frames: list[dict[str, Any]] = []
        subscribed_ms = 0.0
        while not frames or frames[-1]["cseq"] < until:
            frame = await receive(ws)
            if frame["type"] == "subscribed":
                subscribed_ms = (time.perf_counter() - start) * 1000
            elif "cseq" in frame:
                frames.append(frame)
        return frames, subscribed_ms, (time.perf_counter() - start) * 1000


async def bounded(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Awaitable[Any]) -> Any:
        async with gate:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


async def write_away(cb: Client, creates: int, edits: int, deletes: int) -> None:
    written = await bounded([cb.append(TID, f"away {i}") for i in range(creates)])
    mids = [w.doc["message_id"] for w in written]
    await bounded([cb.edit_message(TID, m, content="edited") for m in mids[:edits]])
    await bounded([cb.delete_message(TID, m) for m in mids[:deletes]])


async def expected_changes(cb: Client, after: int) -> tuple[dict[str, int], int]:
    """Each entity changed after `after` with the cseq of its latest change; the last cseq."""
    latest: dict[str, int] = {}
    last = after
    async for page in cb.change_pages(TID, after_cseq=after, limit=1000):
        for item in page.items:
            doc = item["doc"]
            latest["thread" if item["kind"] == "thread" else f"m:{doc['message_id']}"] = \
                doc["cseq"]
        last = page.last_cseq
    return latest, last


def tally(frames: list[dict[str, Any]], expected: dict[str, int]) -> dict[str, int]:
    seen: dict[str, int] = {}
    duplicates = out_of_order = previous = 0
    for frame in frames:
        duplicates += key(frame) in seen
        out_of_order += frame["cseq"] <= previous
        previous = frame["cseq"]
        seen[key(frame)] = frame["cseq"]
    missing = sum(seen.get(k) != cseq for k, cseq in expected.items())
    return {"expected": len(expected), "replayed": len(frames), "duplicates": duplicates,
            "missing": missing, "out_of_order": out_of_order}


async def measure(a: Sidecar, b: Sidecar, creates: int, edits: int,
                  deletes: int) -> dict[str, Any]:
    async with Client(b.url) as cb, aiohttp.ClientSession() as session:
        await cb.put_thread(TID, title="resume")
        for i in range(BEFORE):
            await cb.append(TID, f"before {i}")
        head = (await cb.changes(TID, limit=1)).last_cseq
        seen, _, _ = await follow(session, a, 0, head)  # then the socket goes away
        position = seen[-1]["cseq"]
        start = time.perf_counter()
        await write_away(cb, creates, edits, deletes)
        write_s = time.perf_counter() - start
        expected, last = await expected_changes(cb, position)
        frames, subscribed_ms, catch_up_ms = await follow(session, a, position, last)
    return {"creates": creates, "edits": edits, "deletes": deletes, "sidecars": 2,
            "position": position, "last_cseq": last,
            "writes_per_s": round((creates + edits + deletes) / write_s),
            **tally(frames, expected), "subscribed_ms": round(subscribed_ms, 2),
            "catch_up_ms": round(catch_up_ms, 2),
            "replayed_per_s": round(len(frames) / (catch_up_ms / 1000))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--creates", type=int, default=1000)
    p.add_argument("--edits", type=int, default=None, help="default: half the creates")
    p.add_argument("--deletes", type=int, default=None, help="default: a quarter")
    o = p.parse_args(argv)
    edits = o.creates // 2 if o.edits is None else min(o.edits, o.creates)
    deletes = o.creates // 4 if o.deletes is None else min(o.deletes, o.creates)
    with harness.temporary_stack(baselines=False) as stack, \
            stack.extra_sidecar("sidecar2") as second:
        result = asyncio.run(measure(stack.main_sidecar(), second, o.creates, edits, deletes))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if not (result["duplicates"] or result["missing"] or result["out_of_order"]) else 1


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
