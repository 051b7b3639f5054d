"""proxy/openapi: the document is valid OpenAPI 3.1 and follows the settings (bearer security only
with a token, the configured limits), documents exactly the routes the app registers, its links
lead where they say, its request-body schemas accept and reject what model.py does, and real
responses have documented statuses, headers and shapes. tests/test_schemathesis.py fuzzes it."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy import keys, model, openapi, routes
from proxy import settings as config
from proxy.app import create_app, create_metrics_app
from proxy.errors import Invalid, Malformed
from proxy.openapi import DOCUMENT
from tests.conftest import AppClient

GUARDED = openapi.document(config.Settings().replace("api", token="s3cret"))

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}

BASE = "urn:tierproxy:openapi"
REGISTRY = Registry().with_resource(BASE, Resource(contents=DOCUMENT, specification=DRAFT202012))


def _absolute(node: Any) -> Any:
    """A schema taken out of the document, its local $refs pointing into the document."""
    if isinstance(node, dict):
        return {k: BASE + v if k == "$ref" and v.startswith("#") else _absolute(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute(v) for v in node]
    return node


def schema_validator(schema: Any) -> Draft202012Validator:
    return Draft202012Validator(_absolute(schema), registry=REGISTRY,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def resolve(node: Any, document: dict[str, Any] = DOCUMENT) -> Any:
    """Follow local $refs to the object they name."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


# ---- (1) a valid OpenAPI 3.1 document, as served


@pytest.mark.parametrize("document", [DOCUMENT, GUARDED], ids=["no-token", "token"])
def test_document_is_valid_openapi_31(document: dict[str, Any]) -> None:
    validate(document, cls=OpenAPIV31SpecValidator)
    assert document["openapi"] == "3.1.0"
    assert orjson.loads(orjson.dumps(document)) == document  # what /openapi.json sends


def operations(document: dict[str, Any] = DOCUMENT) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in document["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS]


def test_with_a_token_v1_operations_need_it_and_probes_do_not() -> None:
    assert GUARDED["components"]["securitySchemes"] == {"bearer": openapi.BEARER}
    for method, path, op in operations(GUARDED):
        guarded = path.startswith("/v1")
        assert op.get("security") == ([{"bearer": []}] if guarded else None), (method, path)
        assert ("401" in op["responses"]) == guarded, (method, path)
    unauthorized = resolve(GUARDED["components"]["responses"]["Unauthorized"], GUARDED)
    assert set(unauthorized["headers"]) == {"WWW-Authenticate"}


def test_without_a_token_nothing_declares_security_or_401() -> None:
    assert "securitySchemes" not in DOCUMENT["components"]
    assert "Unauthorized" not in DOCUMENT["components"]["responses"]
    assert "WWW-Authenticate" not in DOCUMENT["components"]["headers"]
    for method, path, op in operations():
        assert "security" not in op and "401" not in op["responses"], (method, path)


def test_document_states_the_configured_limits_and_addresses() -> None:
    s = config.Settings()
    s = s.replace("api", host="127.0.0.2", port=9001, max_content_chars=300,
                  max_body_bytes=5000).replace("metrics", port=9002)
    document = openapi.document(s)
    schemas = document["components"]["schemas"]
    assert schemas["MessageInput"]["properties"]["content"]["maxLength"] == 300
    assert schemas["MessagePatch"]["properties"]["content"]["maxLength"] == 300
    assert "5000 bytes" in document["components"]["responses"]["TooLarge"]["description"]
    assert document["servers"][0]["url"] == "http://127.0.0.2:9001"
    assert document["paths"]["/metrics"]["servers"][0]["url"] == "http://{host}:9002"
    assert openapi.document() == DOCUMENT == openapi.document(config.load(env={}))


def test_every_503_carries_retry_after_and_entity_responses_carry_etag() -> None:
    for method, path, op in operations():
        for status, spec in op["responses"].items():
            spec = resolve(spec)
            if status == "503" and path.startswith("/v1"):
                assert "Retry-After" in spec.get("headers", {}), (method, path)
            # Pages, stats, read markers and the changes feed (no version, no If-Match) carry
            # no ETag.
            if status in ("200", "201") and "{" in path and not path.endswith((
                    "messages", "stats", "read-markers/{uid}", "changes")):
                assert {"ETag", "X-Tier"} <= set(spec.get("headers", {})), (method, path)


# ---- (2) complete: every registered route documented, every documented one registered


def _template(canonical: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", canonical)  # drop any {name:regex}


def registered() -> set[tuple[str, str]]:
    api = create_app(config.load(env={}))
    found = set()
    for app in (api, create_metrics_app(api)):
        for route in app.router.routes():
            if route.method == "HEAD":
                continue
            assert route.resource is not None
            found.add((route.method, _template(route.resource.canonical)))
    return found


def documented() -> set[tuple[str, str]]:
    return {(method, path) for method, path, _ in operations()}


def test_every_registered_route_is_documented() -> None:
    missing = registered() - documented()
    assert not missing, f"routes without an entry in proxy/openapi.py: {sorted(missing)}"


def test_every_documented_route_is_registered() -> None:
    extra = documented() - registered()
    assert not extra, f"documented but not registered: {sorted(extra)}"


# ---- (3) request-body schemas agree with model.parse_*


def _parse(schema: str, body: Any) -> None:
    api = config.load(env={}).api
    limits = model.Limits(api.max_content_chars, api.max_metadata_bytes)
    {"ThreadInput": lambda: model.parse_thread(body, limits),
     "MessageInput": lambda: model.parse_message(body, limits),
     "MessagePatch": lambda: model.parse_patch(body, limits),
     "StateInput": lambda: model.parse_state(body, api.max_body_bytes),
     "ReadMarkerInput": lambda: model.parse_marker(body)}[schema]()


def model_accepts(schema: str, body: Any) -> bool:
    try:
        _parse(schema, body)
    except Invalid:
        return False
    return True


def schema_accepts(schema: str, body: Any) -> bool:
    return schema_validator({"$ref": f"#/components/schemas/{schema}"}).is_valid(body)


MSG = {"role": "user", "content": "hi"}
SAMPLES: list[tuple[str, Any]] = [
    ("ThreadInput", {}),
    ("ThreadInput", {"title": "t", "owner_id": "u-1", "metadata": {"a": [1, {"b": None}]}}),
    ("ThreadInput", {"title": "é" * 1024, "owner_id": "o" * 128}),
    ("ThreadInput", {"title": "x" * 1025}),
    ("ThreadInput", {"owner_id": "x" * 129}),
    ("ThreadInput", {"title": 5}),
    ("ThreadInput", {"title": None}),
    ("ThreadInput", {"title": "a\x00b"}),
    ("ThreadInput", {"metadata": [1]}),
    ("ThreadInput", {"metadata": {"deep": [{"x": "\x00"}]}}),
    ("ThreadInput", {"metadata": {"a\x00": 1}}),
    ("ThreadInput", {"thread_id": "t"}),
    ("ThreadInput", []),
    ("ThreadInput", "title"),
    ("MessageInput", MSG),
    ("MessageInput", {"role": "user", "content": ""}),
    ("MessageInput", {**MSG, "message_id": "m-1.a:b_c", "metadata": {"k": "v"}}),
    ("MessageInput", {**MSG, "message_id": None}),
    ("MessageInput", {**MSG, "message_id": "bad id"}),
    ("MessageInput", {**MSG, "message_id": "m" * 129}),
    ("MessageInput", {**MSG, "message_id": 7}),
    ("MessageInput", {"role": "user"}),
    ("MessageInput", {"content": "x"}),
    ("MessageInput", {"role": "", "content": "x"}),
    ("MessageInput", {"role": "r" * 64, "content": "x"}),
    ("MessageInput", {"role": "r" * 65, "content": "x"}),
    ("MessageInput", {"role": "user", "content": "c" * 65_536}),
    ("MessageInput", {"role": "user", "content": "c" * 65_537}),
    ("MessageInput", {"role": "user", "content": 1}),
    ("MessageInput", {**MSG, "seq": 1}),
    ("MessagePatch", {}),
    ("MessagePatch", {"content": "new"}),
    ("MessagePatch", {"role": "tool", "metadata": {"edited": True}}),
    ("MessagePatch", {"role": ""}),
    ("MessagePatch", {"content": None}),
    ("MessagePatch", {"message_id": "m"}),
    ("MessagePatch", {"deleted": True}),
    ("StateInput", {"value": None}),
    ("StateInput", {"value": {"nested": [1, "a\x00"]}}),
    ("StateInput", {"value": 1, "ttl": 1}),
    ("StateInput", {"value": 1, "ttl": 0.5}),
    ("StateInput", {"value": 1, "ttl": None}),
    ("StateInput", {"value": 1, "ttl": 10 * 365 * 86400}),
    ("StateInput", {"value": 1, "ttl": 10 * 365 * 86400 + 1}),
    ("StateInput", {"value": 1, "ttl": 0}),
    ("StateInput", {"value": 1, "ttl": -1}),
    ("StateInput", {"value": 1, "ttl": True}),
    ("StateInput", {"value": 1, "ttl": "10"}),
    ("StateInput", {"ttl": 5}),
    ("StateInput", {"value": 1, "expires_at": None}),
    ("StateInput", [1]),
    ("ReadMarkerInput", {"seq": 0}),
    ("ReadMarkerInput", {"seq": 2**53}),
    ("ReadMarkerInput", {"seq": 2**53 + 1}),
    ("ReadMarkerInput", {"seq": -1}),
    ("ReadMarkerInput", {"seq": 1.5}),
    ("ReadMarkerInput", {"seq": True}),
    ("ReadMarkerInput", {"seq": "3"}),
    ("ReadMarkerInput", {"seq": None}),
    ("ReadMarkerInput", {}),
    ("ReadMarkerInput", {"seq": 1, "user_id": "u"}),
    ("ReadMarkerInput", [1]),
]


@pytest.mark.parametrize(("schema", "body"), SAMPLES,
                         ids=[f"{s}-{i}" for i, (s, _) in enumerate(SAMPLES)])
def test_body_schema_agrees_with_model(schema: str, body: Any) -> None:
    assert schema_accepts(schema, body) == model_accepts(schema, body)


def test_samples_cover_both_verdicts_of_every_body_schema() -> None:
    verdicts = {(schema, model_accepts(schema, body)) for schema, body in SAMPLES}
    bodies = {"ThreadInput", "MessageInput", "MessagePatch", "StateInput", "ReadMarkerInput"}
    assert verdicts == {(s, v) for s in bodies for v in (True, False)}


@pytest.mark.parametrize("value", ["a", "A.b_c:d-1", "x" * 128, "", "x" * 129, "a b", "a/b",
                                   "é", "a\x00"])
def test_id_pattern_agrees_with_check_id(value: str) -> None:
    try:
        model.check_id(value, "thread_id")
        accepted = True
    except Invalid:
        accepted = False
    param = resolve(DOCUMENT["paths"]["/v1/threads/{tid}"]["parameters"][0])
    assert schema_validator(param["schema"]).is_valid(value) == accepted
    assert param["schema"]["pattern"] == keys.ID_PATTERN


def test_page_query_agrees_with_routes() -> None:
    page = resolve({"$ref": "#/components/parameters/page"})
    assert (page["in"], page["style"], page["explode"]) == ("query", "form", True)
    props = page["schema"]["properties"]
    limit = props["limit"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (
        1, model.MAX_PAGE, model.DEFAULT_PAGE)
    for name, low in (("after", 0), ("before", 1)):
        routes.int_param(str(low), name, low, model.MAX_CURSOR)
        with pytest.raises(Malformed):
            routes.int_param(str(low - 1), name, low, model.MAX_CURSOR)
        assert (props[name]["minimum"], props[name]["maximum"]) == (low, model.MAX_CURSOR)


@pytest.mark.parametrize(("query", "accepted"), [
    ({}, True), ({"limit": 5}, True), ({"before": 3, "limit": 2}, True), ({"after": 0}, True),
    ({"before": 3, "after": 1}, False), ({"cursor": 1}, False), ({"limit": 0}, False)])
def test_page_schema_refuses_what_routes_refuse(query: dict[str, int], accepted: bool) -> None:
    page = resolve({"$ref": "#/components/parameters/page"})
    assert schema_validator(page["schema"]).is_valid(query) == accepted


def _target(op_id: str) -> tuple[dict[str, Any], set[str]]:
    """The operation with that id and the names of its parameters (path item's included)."""
    for item in DOCUMENT["paths"].values():
        for method, op in item.items():
            if method in HTTP_METHODS and op["operationId"] == op_id:
                params = [resolve(p) for p in item.get("parameters", []) + op.get("parameters", [])]
                return op, {f"{p['in']}.{p['name']}" for p in params}
    raise AssertionError(f"no operation {op_id}")


def test_links_lead_to_operations_with_the_parameters_they_set() -> None:
    found = 0
    for method, path, op in operations():
        source = {f"{p['in']}.{p['name']}" for p in map(resolve, DOCUMENT["paths"][path].get(
            "parameters", []) + op.get("parameters", []))}
        for status, spec in op["responses"].items():
            for name, link in resolve(spec).get("links", {}).items():
                found += 1
                target, params = _target(link["operationId"])
                where = f"{method} {path} {status} {name}"
                for param, expression in link["parameters"].items():
                    assert (param if "." in param else f"path.{param}") in params, where
                    if expression.startswith("$request.path."):
                        assert "path." + expression.removeprefix("$request.path.") in source
                    if expression.startswith("$response.body#/"):
                        body = resolve(resolve(spec)["content"]["application/json"]["schema"])
                        assert expression.removeprefix("$response.body#/") in body["properties"]
                    if expression.startswith("$response.header."):
                        assert expression.removeprefix("$response.header.") in spec_headers(spec)
    assert found >= 30


def spec_headers(spec: dict[str, Any]) -> set[str]:
    return set(resolve(spec).get("headers", {}))


def test_links_cover_the_stateful_chains() -> None:
    """put thread -> read it, append; append -> read, edit, delete the message by the id
    answered; put state -> read, delete; a delete -> read again."""
    def leads(op_id: str, status: str) -> set[str]:
        op, _ = _target(op_id)
        return {link["operationId"] for link in
                resolve(op["responses"][status]).get("links", {}).values()}

    assert {"getThread", "appendMessage", "deleteThread"} <= leads("putThread", "201")
    assert {"getMessage", "patchMessage", "deleteMessage"} <= leads("appendMessage", "201")
    assert {"getState", "deleteState"} <= leads("putState", "201")
    assert leads("deleteMessage", "200") == {"getMessage"}
    mid = _target("appendMessage")[0]["responses"]["201"]["links"]["GetMessage"]
    assert mid["parameters"]["mid"] == "$response.body#/message_id"


# Known disagreements between model.py and the documented contract (found while writing this
# file). strict: each fails once fixed, so the marker gets removed with the fix.
def test_check_id_rejects_a_trailing_newline() -> None:
    with pytest.raises(Invalid):
        model.check_id("thread-1\n", "thread_id")


def test_metadata_may_contain_the_text_backslash_u0000() -> None:
    assert model_accepts("ThreadInput", {"metadata": {"path": "C:\\u0000"}})


# ---- responses as served


class Exchange:
    """Requests against a real app, each response checked against the documented operation."""

    def __init__(self, client: Any, document: dict[str, Any] = DOCUMENT) -> None:
        self.client, self.document = client, document

    async def __call__(self, method: str, template: str, url: str, status: int,
                       **kwargs: Any) -> Any:
        resp = await self.client.request(method, url, **kwargs)
        body = await resp.read()
        assert resp.status == status, body
        op = self.document["paths"][template][method.lower()]
        assert str(status) in op["responses"], f"{method} {template}: {status} not documented"
        spec = resolve(op["responses"][str(status)], self.document)
        for name in spec.get("headers", {}):
            assert name in resp.headers, f"{method} {url}: no {name} header"
        if "content" not in spec:
            return None
        media, content = next(iter(spec["content"].items()))
        assert resp.content_type == media
        data = orjson.loads(body)
        schema_validator(content["schema"]).validate(data)
        return data


async def test_responses_match_the_document(client: Any, settings: config.Settings) -> None:
    call = Exchange(client)
    thread, msgs, msg, state = ("/v1/threads/{tid}", "/v1/threads/{tid}/messages",
                                "/v1/threads/{tid}/messages/{mid}", "/v1/state/{key}")
    await call("PUT", thread, "/v1/threads/t1", 201, json={"title": "one"})
    await call("PUT", thread, "/v1/threads/t1", 200, json={"title": "two"},
               headers={"If-Match": '"1"'})
    await call("PUT", thread, "/v1/threads/t1", 412, json={}, headers={"If-Match": '"1"'})
    await call("GET", thread, "/v1/threads/t1", 200)
    await call("GET", thread, "/v1/threads/nope", 404)
    await call("GET", thread, "/v1/threads/bad%20id", 422)
    await call("PUT", thread, "/v1/threads/t1", 415, data=b"{}")
    await call("PUT", thread, "/v1/threads/t1", 400, data=b"{", headers={
        "Content-Type": "application/json"})
    await call("PUT", thread, "/v1/threads/t1", 422, json={"nope": 1})
    await call("PUT", thread, "/v1/threads/t1", 400, json={},
               headers={"X-Durability": "eventually"})
    body = {"message_id": "m1", "role": "user", "content": "hi"}
    await call("POST", msgs, "/v1/threads/t1/messages", 201, json=body)
    await call("POST", msgs, "/v1/threads/t1/messages", 200, json=body)
    await call("POST", msgs, "/v1/threads/t1/messages", 409, json={**body, "content": "other"})
    await call("POST", msgs, "/v1/threads/t1/messages", 201, json={"role": "bot", "content": "x"})
    await call("POST", msgs, "/v1/threads/none/messages", 404, json=body)
    page = await call("GET", msgs, "/v1/threads/t1/messages?limit=1", 200)
    assert page["next_cursor"] == {"before": 2} and page["items"][0]["seq"] == 2
    page = await call("GET", msgs, "/v1/threads/t1/messages?after=0&limit=1", 200)
    assert page["next_cursor"] == {"after": 1}
    page = await call("GET", msgs, "/v1/threads/t1/messages?before=2", 200)
    assert page["next_cursor"] is None
    await call("GET", msgs, "/v1/threads/t1/messages?before=1&after=1", 400)
    await call("GET", msgs, "/v1/threads/t1/messages?limit=1001", 400)
    await call("GET", msg, "/v1/threads/t1/messages/m1", 200)
    await call("PATCH", msg, "/v1/threads/t1/messages/m1", 200, json={"content": "edited"},
               headers={"If-Match": '"1"'})
    await call("PATCH", msg, "/v1/threads/t1/messages/m1", 412, json={"content": "again"},
               headers={"If-Match": '"1"'})
    await call("PATCH", msg, "/v1/threads/t1/messages/m1", 422, json={})
    await call("DELETE", msg, "/v1/threads/t1/messages/m1", 200)
    await call("GET", msg, "/v1/threads/t1/messages/m1", 404)
    changes = "/v1/threads/{tid}/changes"
    feed = await call("GET", changes, "/v1/threads/t1/changes?limit=2", 200)
    assert [i["kind"] for i in feed["items"]] == ["thread", "message"]
    assert feed["next_cursor"] == {"after_cseq": 4} and feed["last_cseq"] == 6
    await call("GET", changes, "/v1/threads/t1/changes?after_cseq=4", 200)
    await call("GET", changes, "/v1/threads/t1/changes?after_cseq=7", 409)
    await call("GET", changes, "/v1/threads/t1/changes?after=1", 400)
    await call("GET", changes, "/v1/threads/nope/changes", 404)
    await call("PUT", state, "/v1/state/k1", 201, json={"value": {"a": 1}, "ttl": 60})
    await call("PUT", state, "/v1/state/k1", 200, json={"value": [1]})
    await call("GET", state, "/v1/state/k1", 200)
    await call("DELETE", state, "/v1/state/k1", 412, headers={"If-Match": "9"})
    await call("DELETE", state, "/v1/state/k1", 200)
    await call("GET", state, "/v1/state/k1", 404)
    await call("DELETE", thread, "/v1/threads/t1", 200)
    await call("PUT", thread, "/v1/threads/t1", 409, json={})
    await call("GET", "/v1/status", "/v1/status", 200)
    await call("POST", "/v1/admin/dead-letters/replay", "/v1/admin/dead-letters/replay", 200)
    await call("GET", "/healthz", "/healthz", 200)
    await call("GET", "/readyz", "/readyz", 200)
    assert await call("GET", "/openapi.json", "/openapi.json", 200) == openapi.document(settings)


async def test_what_schemathesis_found_is_answered_as_documented(client: Any) -> None:
    """Issue 11.5: each answer a documented status with a documented body."""
    call = Exchange(client)
    thread, state = "/v1/threads/{tid}", "/v1/state/{key}"
    # An empty X-Durability names no level (it was taken for the default and stored).
    await call("PUT", thread, "/v1/threads/t1", 400, json={}, headers={"X-Durability": ""})
    await call("GET", thread, "/v1/threads/t1", 404)
    # An empty If-Match names no version: 412, saying what the entry is at (nothing).
    error = await call("PUT", state, "/v1/state/k1", 412, json={"value": 1},
                       headers={"If-Match": ""})
    assert error["error"]["message"] == "state k1 does not exist"
    assert error["error"]["detail"] == {"version": None}
    # before with after: refused, and the page schema says so (test_page_schema_refuses...).
    await call("PUT", thread, "/v1/threads/t1", 201, json={})
    await call("GET", "/v1/threads/{tid}/messages", "/v1/threads/t1/messages?before=2&after=0",
               400)
    # A GET of /v1/ws that is no WebSocket handshake.
    await call("GET", "/v1/ws", "/v1/ws", 400)


async def test_unauthorized_responses_match_the_document(client_for: AppClient,
                                                         settings: config.Settings) -> None:
    guarded = settings.replace("api", token="s3cret")
    call = Exchange(await client_for(guarded), openapi.document(guarded))
    await call("GET", "/v1/threads/{tid}", "/v1/threads/t1", 401)
    await call("GET", "/v1/state/{key}", "/v1/state/k", 401,
               headers={"Authorization": "Bearer wrong"})
    await call("GET", "/healthz", "/healthz", 200)
