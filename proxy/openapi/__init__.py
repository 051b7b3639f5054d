"""The OpenAPI 3.1 document of the API, served at /openapi.json. tests/test_openapi.py fails
when a registered route is missing here and checks the body schemas against model.py."""

from __future__ import annotations

from proxy.openapi.paths import probe_paths, v1_paths
from proxy.openapi.schemas import (
    Schema,
    entity_schemas,
    error_responses,
    headers,
    input_schemas,
    ops_schemas,
    parameters,
    ws_schemas,
)


def document() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {"title": "tierproxy", "version": "1", "description": "Write-behind storage "
                 "sidecar. Every error is `{\"error\": {\"code\", \"message\", \"detail\"}}`."},
        "servers": [{"url": "http://127.0.0.1:8750", "description": "the API (loopback)"}],
        "paths": {**v1_paths(), **probe_paths()},
        "components": {
            "schemas": {**input_schemas(), **entity_schemas(), **ops_schemas(),
                        **ws_schemas()},
            "parameters": parameters(),
            "headers": headers(),
            "responses": error_responses(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Needed on /v1 when api.token is set."}},
        },
    }


DOCUMENT: Schema = document()
