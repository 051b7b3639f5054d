"""proxy.model, pure: what every request body must satisfy (a rejected body names its field),
how versions are read from stored docs, ids, body fingerprints, and the next versions of a
message doc."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import orjson
import pytest

from proxy import backends, model
from proxy.errors import Invalid
from proxy.keys import ID_RE

LIMITS = model.Limits(max_content_chars=100, max_metadata_bytes=200)
STAMP = "2026-01-01T00:00:00.000Z"


def invalid(field: str, parse: Any, *args: Any) -> Invalid:
    """`parse(*args)` must reject the body naming `field`."""
    with pytest.raises(Invalid) as caught:
        parse(*args)
    assert caught.value.detail == {"field": field}, caught.value.message
    return caught.value


# ---- threads


def test_a_valid_thread_body() -> None:
    t = model.parse_thread({"title": "hi", "owner_id": "u1", "metadata": {"a": [1]}}, LIMITS)
    assert t == model.ThreadInput("hi", "u1", {"a": [1]})
    assert model.parse_thread({}, LIMITS) == model.ThreadInput("", "", {})


@pytest.mark.parametrize("body,field", [
    ([], "body"),
    ("title", "body"),
    (None, "body"),
    ({"title": "x", "colour": "red"}, "colour"),
    ({"title": 1}, "title"),
    ({"title": "x" * 1025}, "title"),
    ({"title": "a\x00b"}, "title"),
    ({"owner_id": "o" * 129}, "owner_id"),
    ({"owner_id": ["u1"]}, "owner_id"),
    ({"metadata": []}, "metadata"),
    ({"metadata": "{}"}, "metadata"),
    ({"metadata": {"n": 2**64}}, "metadata"),  # beyond 64 bits: not stored exactly
    ({"metadata": {"n": -(2**63) - 1}}, "metadata"),
    ({"metadata": {"k": "v" * 300}}, "metadata"),  # over max_metadata_bytes
    ({"metadata": {"a\x00": 1}}, "metadata"),  # NUL in a key
    ({"metadata": {"a": [{"b": "c\x00"}]}}, "metadata"),  # NUL deep in a value
])
def test_a_bad_thread_body_names_its_field(body: Any, field: str) -> None:
    invalid(field, model.parse_thread, body, LIMITS)


def test_lengths_are_inclusive_bounds() -> None:
    assert model.parse_thread({"title": "x" * 1024, "owner_id": "o" * 128}, LIMITS)
    assert model.parse_thread({"metadata": {"n": 2**64 - 1, "m": -(2**63)}}, LIMITS)
    room = LIMITS.max_metadata_bytes - len(b'{"k":""}')
    assert model.parse_thread({"metadata": {"k": "v" * room}}, LIMITS)
    invalid("metadata", model.parse_thread, {"metadata": {"k": "v" * (room + 1)}}, LIMITS)


# ---- messages


def test_a_valid_message_body() -> None:
    m = model.parse_message({"role": "user", "content": "c" * 100}, LIMITS)
    assert m == model.MessageInput(None, "user", "c" * 100, {})
    m = model.parse_message({"message_id": "a.B_c:9-", "role": "r", "content": ""}, LIMITS)
    assert m.message_id == "a.B_c:9-"


@pytest.mark.parametrize("body,field", [
    ({"content": "x"}, "role"),
    ({"role": "user"}, "content"),
    ({"role": "", "content": "x"}, "role"),
    ({"role": "r" * 65, "content": "x"}, "role"),
    ({"role": "us\x00er", "content": "x"}, "role"),
    ({"role": "user", "content": "c" * 101}, "content"),
    ({"role": "user", "content": 5}, "content"),
    ({"role": "user", "content": "\x00"}, "content"),
    ({"role": "user", "content": "x", "message_id": 7}, "message_id"),
    ({"role": "user", "content": "x", "message_id": ""}, "message_id"),
    ({"role": "user", "content": "x", "message_id": "m" * 129}, "message_id"),
    ({"role": "user", "content": "x", "message_id": "a{b}"}, "message_id"),
    ({"role": "user", "content": "x", "message_id": "a/b"}, "message_id"),
    ({"role": "user", "content": "x", "metadata": {"n": 2**70}}, "metadata"),
    ({"role": "user", "content": "x", "seq": 3}, "seq"),
])
def test_a_bad_message_body_names_its_field(body: Any, field: str) -> None:
    invalid(field, model.parse_message, body, LIMITS)


def test_a_patch_changes_only_what_it_names() -> None:
    assert model.parse_patch({"content": "new"}, LIMITS).fields == {"content": "new"}
    patch = model.parse_patch({"role": "bot", "metadata": {"a": 1}}, LIMITS)
    assert patch.fields == {"role": "bot", "metadata": {"a": 1}}


@pytest.mark.parametrize("body,field", [
    ({}, "body"),
    ([], "body"),
    ({"message_id": "m1"}, "message_id"),
    ({"role": ""}, "role"),
    ({"content": "c" * 101}, "content"),
    ({"content": "a\x00"}, "content"),
    ({"metadata": {"n": 2**64}}, "metadata"),
])
def test_a_bad_patch_names_its_field(body: Any, field: str) -> None:
    invalid(field, model.parse_patch, body, LIMITS)


# ---- state


@pytest.mark.parametrize("ttl", [None, 0.001, 1, 86400.5, model.TTL_MAX_S])
def test_ttl_within_bounds(ttl: Any) -> None:
    body = {"value": {"a": 1}} if ttl is None else {"value": {"a": 1}, "ttl": ttl}
    state = model.parse_state(body, 100)
    assert state.value == {"a": 1}
    assert state.ttl_s == (None if ttl is None else float(ttl))


@pytest.mark.parametrize("ttl", [0, -1, model.TTL_MAX_S + 1, True, False, "5", [5],
                                 float("nan"), float("inf")])
def test_ttl_out_of_bounds(ttl: Any) -> None:
    invalid("ttl", model.parse_state, {"value": 1, "ttl": ttl}, 100)


@pytest.mark.parametrize("value", [None, 0, "", [], {}, [1, "two", {"3": None}]])
def test_any_json_value_is_a_state_value(value: Any) -> None:
    assert model.parse_state({"value": value}, 100).value == value


@pytest.mark.parametrize("body,field", [
    ({}, "value"),
    ({"ttl": 5}, "value"),
    ({"value": 1, "expires": 5}, "expires"),
    ({"value": "v" * 99}, "value"),  # 101 bytes as JSON
    ({"value": 2**64}, "value"),
    ({"value": {"k\x00": 1}}, "value"),
    ({"value": ["\x00"]}, "value"),
    ("value", "body"),
])
def test_a_bad_state_body_names_its_field(body: Any, field: str) -> None:
    invalid(field, model.parse_state, body, 100)


def test_the_state_value_bound_is_inclusive() -> None:
    assert model.parse_state({"value": "v" * 98}, 100).value == "v" * 98  # 100 bytes


# ---- versions of stored docs


@pytest.mark.parametrize("doc,version", [
    (b'{"version":7,"key":"k"}', 7),
    (b'{"seq":9007199254740992,"version":123456789012,"message_id":"m"}', 123456789012),
    (b'{"version":1}', 1),
])
def test_version_of_reads_the_front_of_a_doc(doc: bytes, version: int) -> None:
    assert model.version_of(doc) == version


@pytest.mark.parametrize("doc,version", [
    (b'{"version": 5, "key": "k"}', 5),  # not the compact form: parsed
    (b'{"key":"' + b"k" * 60 + b'","version":8}', 8),  # beyond the front: parsed
    (b'{"title":"' + b"t" * 60 + b'","m":{"version":99},"version":4}', 4),
])
def test_version_of_falls_back_to_parsing(doc: bytes, version: int) -> None:
    assert model.version_of(doc) == version


def test_version_of_every_doc_a_backend_builds() -> None:
    """The docs built from database rows keep version near the front (the fast path)."""
    stamp = datetime.fromisoformat(STAMP)
    big = 2**53
    rows = [
        backends.thread_row(thread_id="t" * 128, title="x" * 500, owner_id="o", metadata={},
                            created_at=stamp, updated_at=stamp, version=big, last_seq=big,
                            deleted=False).doc,
        backends.message_row(message_id="m" * 128, thread_id="t", seq=big, role="user",
                             content="c", metadata={}, created_at=stamp, updated_at=stamp,
                             version=big - 1, deleted=False).doc,
        backends.state_row(key="k" * 128, value=[1], version=big - 2, expires_at=None,
                           updated_at=stamp, deleted=False).doc,
    ]
    assert [model.version_of(doc) for doc in rows] == [big, big - 1, big - 2]
    assert all(doc.find(b'"version":', 0, 48) >= 0 for doc in rows)


# ---- ids


def test_new_id_is_a_valid_sortable_id() -> None:
    before = model.now_ms()
    first = model.new_id()
    assert len(first) == 26 and ID_RE.fullmatch(first)
    assert set(first) <= set(model._CROCKFORD)
    stamped = _decode_ms(first[:10])
    assert before <= stamped <= model.now_ms()
    while model.now_ms() == stamped:  # the next millisecond
        time.sleep(0.0005)
    assert model.new_id() > first


def _decode_ms(text: str) -> int:
    """The 48-bit time of an id (its first 10 base32 digits hold 50 bits, the top 2 zero)."""
    n = 0
    for ch in text:
        n = n * 32 + model._CROCKFORD.index(ch)
    return n


def test_new_ids_are_unique() -> None:
    ids = [model.new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)


# ---- fingerprints


def _fp(role: str = "user", content: str = "hi", metadata: Any = None,
        mid: str | None = None) -> str:
    return model.MessageInput(mid, role, content, metadata or {}).fingerprint()


def test_equal_bodies_have_equal_fingerprints() -> None:
    assert _fp(metadata={"a": 1, "b": {"x": 1, "y": 2}}) == _fp(
        metadata={"b": {"y": 2, "x": 1}, "a": 1})
    assert _fp(mid="m1") == _fp(mid="m2") == _fp()  # the id is not part of the body


@pytest.mark.parametrize("other", [
    {"role": "assistant"}, {"content": "hi "}, {"content": "Hi"},
    {"metadata": {"a": 1}}, {"metadata": {"a": "1"}},
    {"role": "use", "content": "rhi"},  # fields are not concatenated
])
def test_different_bodies_have_different_fingerprints(other: dict[str, Any]) -> None:
    assert _fp(**other) != _fp()


# ---- docs and their next versions


def _message_doc() -> dict[str, Any]:
    body = model.message_body("t1", "m1", model.MessageInput(None, "user", "text", {"a": 1}), 0)
    return {"seq": 5, **orjson.loads(body)}


def test_an_edit_keeps_the_seq_and_bumps_the_version() -> None:
    doc = _message_doc()
    edited = model.edited_message(doc, {"content": "new"}, 86_400_000)
    assert list(edited) == list(doc)  # seq stays first: version_of's fast path
    assert edited == {**doc, "content": "new", "version": 2,
                      "updated_at": "1970-01-02T00:00:00.000Z"}
    assert model.edited_message({**doc, "version": "41"}, {}, 0)["version"] == 42
    assert doc["version"] == 1 and doc["content"] == "text"  # the input is not changed


def test_a_tombstone_keeps_the_seq_and_empties_the_content() -> None:
    doc = _message_doc()
    gone = model.deleted_message(model.edited_message(doc, {"content": "v2"}, 1000), 2000)
    assert gone["seq"] == 5 and gone["version"] == 3 and gone["deleted"] is True
    assert gone["content"] == "" and gone["metadata"] == {}
    assert gone["role"] == "user" and gone["created_at"] == doc["created_at"]
    assert gone["updated_at"] == model.iso(2000)


def test_docs_for_the_scripts() -> None:
    thread = orjson.loads(model.thread_body("t1", model.ThreadInput("T", "o", {}), True, 1))
    assert "version" not in thread and thread["deleted"] is True
    message = _message_doc()
    assert message["version"] == 1 and message["created_at"] == message["updated_at"]
    state = orjson.loads(model.state_body("k", {"v": 1}, 1500, deleted=True, ms=0))
    assert state == {"key": "k", "value": None, "expires_at": "1970-01-01T00:00:01.500Z",
                     "updated_at": "1970-01-01T00:00:00.000Z", "deleted": True}
    assert orjson.loads(model.state_body("k", 0, None, False, 0))["expires_at"] is None


def test_iso_has_milliseconds_in_utc() -> None:
    assert model.iso(0) == "1970-01-01T00:00:00.000Z"
    assert model.iso(1_767_225_600_123) == "2026-01-01T00:00:00.123Z"
    assert model.iso_dt(datetime.fromisoformat("2026-01-01T02:00:00+02:00")) == (
        "2026-01-01T00:00:00.000Z")
