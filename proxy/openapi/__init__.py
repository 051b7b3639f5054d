"""The OpenAPI 3.1 document of the API, served at /openapi.json. It describes one configuration:
the bearer token is declared only when api.token is set, and size limits are the configured
ones. tests/test_openapi.py fails when a registered route is missing here and checks the body
schemas against model.py; tests/test_schemathesis.py runs schemathesis against it."""

from __future__ import annotations

from proxy.openapi.ephemeral import ephemeral_paths, ephemeral_schemas
from proxy.openapi.paths import probe_paths, v1_paths
from proxy.openapi.schemas import (
    Schema,
    authenticated,
    entity_schemas,
    error_responses,
    headers,
    input_schemas,
    ops_schemas,
    parameters,
    ws_schemas,
)
from proxy.settings import Settings

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
BEARER = {"type": "http", "scheme": "bearer",
          "description": "`Authorization: Bearer <api.token>` on every /v1 operation."}


def document(settings: Settings | None = None) -> Schema:
    """The document of the API as `settings` (default: the defaults) configure it."""
    s = settings or Settings()
    auth = bool(s.api.token)
    paths = {**v1_paths(), **ephemeral_paths(s.ephemeral), **probe_paths(s.metrics)}
    components: Schema = {
        "schemas": {**input_schemas(s.api), **entity_schemas(), **ops_schemas(),
                    **ws_schemas(), **ephemeral_schemas(s.ephemeral)},
        "parameters": parameters(),
        "headers": headers(),
        "responses": error_responses(s.api),
    }
    if auth:
        paths = {path: _secured(item) if path.startswith("/v1") else item
                 for path, item in paths.items()}
        components["securitySchemes"] = {"bearer": BEARER}
    else:  # nothing answers 401, nor says WWW-Authenticate
        del components["responses"]["Unauthorized"], components["headers"]["WWW-Authenticate"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "tierproxy", "version": "1", "description": "Write-behind storage "
                 "sidecar. Every error is `{\"error\": {\"code\", \"message\", \"detail\"}}`."},
        "servers": [{"url": f"http://{s.api.host}:{s.api.port}", "description": "the API"}],
        "paths": paths,
        "components": components,
    }


def _secured(item: Schema) -> Schema:
    return {key: authenticated(value) if key in HTTP_METHODS else value
            for key, value in item.items()}


DOCUMENT: Schema = document()
"""The document of the default settings (no token)."""
