"""State entries in Redis: one hash per key (doc, version, tombstone, expiry, unflushed count),
read through from PostgreSQL; an expired entry counts as absent but keeps its version."""

from __future__ import annotations

from proxy import keys, model
from proxy.backends import StateRow
from proxy.errors import NotFound, PreconditionFailed
from proxy.hot.core import Core, Result, settle
from proxy.redisconn import redis_call


class States:
    def __init__(self, core: Core) -> None:
        self._c = core

    async def get(self, key: str) -> Result:
        k = keys.state(self._c.shard(key), key)
        doc, deleted, expires = await redis_call(lambda: self._c.redis.hmget(k, "doc", "del", "x"))
        if doc is None:
            row = await self._c.flights.do(("s", key), lambda: self._load(key))
            if row is None:
                raise NotFound(f"state {key} not found")
            return Result(row.doc, self._c.backing.tier)
        if deleted == b"1" or (expires and _expired(int(expires))):
            raise NotFound(f"state {key} not found")
        return Result(doc)

    async def _load(self, key: str) -> StateRow | None:
        """A live entry from below, cached again; None if absent, deleted or expired."""
        row = await self._c.backing.load_state(key)
        await self._c.failpoints.hit("after-load-before-fill")
        if row is None or row.deleted or _expired(row.expires_at_ms):
            return None
        await self._c.run("fill_state", [keys.state(self._c.shard(key), key)], [
            row.doc, row.version, row.expires_at_ms or "", self._c.ttl_ms, model.now_ms()])
        return row

    async def put(self, key: str, st: model.StateInput, if_match: str,
                  persisted: bool = False) -> Result:
        ms = model.now_ms()
        expires = ms + int(st.ttl_s * 1000) if st.ttl_s is not None else None
        return await self._write(key, model.state_body(key, st.value, expires, False, ms),
                                 if_match, "put", expires, persisted)

    async def delete(self, key: str, if_match: str, persisted: bool = False) -> Result:
        return await self._write(key, model.state_body(key, None, None, True, model.now_ms()),
                                 if_match, "del", None, persisted)

    async def _write(self, key: str, body: bytes, if_match: str, op: str,
                     expires: int | None, persisted: bool) -> Result:
        self._c.admit()
        s, base = self._c.shard(key), ""

        async def attempt() -> Result | None:
            nonlocal base
            ms = model.now_ms()
            out = await self._c.run("state_put", [keys.state(s, key), keys.log(s)], [
                body, if_match, base, op, ms, expires or "", ms, key])
            status = out[0].decode()
            if status == "MISS":  # not in Redis: the script needs PostgreSQL's version
                row = await self._c.backing.load_state(key)
                base = str(row.version) if row else "0"
                return None
            if status == "NOTFOUND":
                raise NotFound(f"state {key} not found")
            if status == "PRECONDITION":
                current = out[1].decode() or None
                raise PreconditionFailed(f"state {key} is at version {current}",
                                         {"version": current})
            if persisted:
                await self._c.backing.persist("state", out[2])
            return Result(out[2], created=status == "CREATED")

        return await settle(f"state {key}", attempt)


def _expired(expires_at_ms: int | None) -> bool:
    return expires_at_ms is not None and expires_at_ms <= model.now_ms()
