"""The OpenAPI 3.1 document of the API (a test fails if a registered route is missing)."""

DOCUMENT: dict[str, object] = {"openapi": "3.1.0", "info": {"title": "tierproxy", "version": "1"},
                               "paths": {}}
