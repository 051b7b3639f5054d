"""State entries in Redis: one hash per key (doc, version, tombstone, expiry, unflushed count),
read through from PostgreSQL; an expired entry counts as absent but keeps its version."""

from __future__ import annotations

from proxy import keys, model
from proxy.backends import StateRow
from proxy.errors import NotFound, PreconditionFailed
from proxy.hot.core import ACKNOWLEDGED, Core, Result, settle


class States:
    def __init__(self, core: Core) -> None:
        self._c = core

    async def get(self, key: str) -> Result:
        k = keys.state(self._c.shard(key), key)
        doc, deleted, expires = await self._c.call(k, "HMGET", k, "doc", "del", "x")
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
        async def load(token: str) -> StateRow | None:
            row = await self._c.backing.load_state(key)
            await self._c.failpoints.hit("after-load-before-fill")
            if row is None or row.deleted or _expired(row.expires_at_ms):
                return None
            await self._c.run("fill_state", [keys.state(self._c.shard(key), key),
                                             self._c.fence_key("k", key)], [
                row.doc, row.version, row.expires_at_ms or "", self._c.ttl_ms,
                model.now_ms(), token])
            return row

        return await self._c.fresh("k", key, load)

    async def put(self, key: str, st: model.StateInput, if_match: str,
                  durability: str = ACKNOWLEDGED) -> Result:
        ms = model.now_ms()
        expires = ms + int(st.ttl_s * 1000) if st.ttl_s is not None else None
        return await self._write(key, model.state_body(key, st.value, expires, False, ms),
                                 if_match, "put", expires, durability)

    async def delete(self, key: str, if_match: str, durability: str = ACKNOWLEDGED) -> Result:
        return await self._write(key, model.state_body(key, None, None, True, model.now_ms()),
                                 if_match, "del", None, durability)

    async def _write(self, key: str, body: bytes, if_match: str, op: str,
                     expires: int | None, durability: str) -> Result:
        self._c.admit()
        s = self._c.shard(key)
        ks = [keys.state(s, key), keys.log(s), self._c.fence_key("k", key)]

        async def attempt(base: str = "", token: str = "") -> Result | None:
            ms = model.now_ms()
            out = await self._c.run("state_put", ks, [
                body, if_match, base, op, ms, expires or "", ms, key, token])
            status = out[0].decode()
            if status == "MISS" and base:  # the fence moved: the entry was released since
                return None
            if status == "MISS":  # not in Redis: the script needs PostgreSQL's entry
                async with self._c.fenced("k", key) as fence:
                    row = await self._c.backing.load_state(key)
                    await self._c.failpoints.hit("after-load-before-fill")
                    return await attempt(f"{row.version},{int(row.deleted)},"
                                         f"{row.expires_at_ms or ''}" if row else "0,1,",
                                         fence.token)
            if status == "NOTFOUND":
                raise NotFound(f"state {key} not found")
            if status == "PRECONDITION":
                current = out[1].decode() or None
                what = f"is at version {current}" if current else "does not exist"
                raise PreconditionFailed(f"state {key} {what}", {"version": current})
            return await self._c.stored("state", key, out[2], durability, status == "CREATED")

        return await settle(f"state {key}", attempt)


def _expired(expires_at_ms: int | None) -> bool:
    return expires_at_ms is not None and expires_at_ms <= model.now_ms()
