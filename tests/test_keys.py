"""proxy.keys, pure: every key one script touches hashes to one Redis Cluster slot (the slot
computed as Redis does: CRC16 of the hash tag, redis-py's key_slot), shards are stable and in
range, and no id can move a key out of its shard's slot."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from redis.crc import key_slot

from proxy import keys

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 16
# Ids the API would refuse (braces), and ones it accepts: the slot must not depend on either.
IDS = ["t1", "a.b_c:d-9", "x" * 128, "}", "{", "{evil}", "a{b}c", "}{x}", "{}", "{0}", "{15}"]


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_key_slot_is_redis_crc16() -> None:
    # The Redis Cluster spec's check value: CRC16-XMODEM("123456789") = 0x31C3.
    assert slot("123456789") == 0x31C3
    assert slot("{user1000}.following") == slot("{user1000}.followers")


def shard_keys(shard: int, entity: str) -> list[str]:
    """Everything a script of this shard may touch for `entity` (thread scripts: thread,
    messages, window, cold cache, read markers, the inbox index of an owner; state scripts:
    the state key), and the shard's streams and channel."""
    return [keys.thread(shard, entity), keys.messages(shard, entity), keys.window(shard, entity),
            keys.cold(shard, entity), keys.markers(shard, entity), keys.state(shard, entity),
            keys.log(shard), keys.dead_letters(shard), keys.events(shard),
            keys.inbox(shard, entity)]  # an owner's inbox index (owner ids may hold braces)


@pytest.mark.parametrize("entity", IDS)
def test_every_key_of_an_entity_shares_its_shards_slot(entity: str) -> None:
    for shard in range(SHARDS):
        slots = {slot(k) for k in shard_keys(shard, entity)}
        assert slots == {slot(keys.log(shard))}, (shard, entity)


def test_entities_of_one_shard_share_a_slot_and_shards_do_not() -> None:
    """release.lua acknowledges many entities of one shard in one call."""
    per_shard = [{slot(k) for e in IDS for k in shard_keys(s, e)} for s in range(SHARDS)]
    assert all(len(slots) == 1 for slots in per_shard)
    assert len(set().union(*per_shard)) == SHARDS


@pytest.mark.parametrize("entity", IDS)
def test_ids_with_braces_cannot_move_keys(entity: str) -> None:
    """The hash tag is the first {...} of a key, and the shard's comes before any id."""
    shard = keys.shard_of(entity, SHARDS)
    for k in shard_keys(shard, entity):
        assert k.startswith(f"tp:{{{shard}}}:")
        assert slot(k) == slot(f"{{{shard}}}")


def test_keys_of_different_entities_and_kinds_differ() -> None:
    names = [k for e in ("a", "b", "a:b") for k in shard_keys(0, e)[:6]]
    assert len(set(names)) == len(names)


def test_shard_of_is_in_range_and_spread() -> None:
    ids = [f"thread-{i}" for i in range(8000)]
    for shards in (1, 2, 3, 4, 7, 64):
        counts = Counter(keys.shard_of(i, shards) for i in ids)
        assert set(counts) == set(range(shards)), shards
        assert min(counts.values()) > len(ids) / shards * 0.7, (shards, counts)


def test_shard_of_is_crc32_and_stable_across_processes() -> None:
    """All sidecars sharing a Redis must agree, whatever their version or hash seed: the shard
    is crc32(id) % shards (ARCHITECTURE.md); changing it would strand every stored key."""
    ids = ["t1", "state-key", "x" * 128, "üñï"]
    here = [keys.shard_of(i, 1024) for i in ids]
    assert here == [567, 311, 567, 919]  # crc32: 1532276279, 3423895863, 2900396599, 4115908503
    code = f"from proxy import keys; print([keys.shard_of(i, 1024) for i in {ids!r}])"
    for seed in ("0", "12345"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={"PYTHONHASHSEED": seed}, cwd=ROOT, timeout=30, check=True)
        assert done.stdout.strip() == str(here), done.stderr
