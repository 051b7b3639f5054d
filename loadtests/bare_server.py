"""The baseline: a bare aiohttp + uvloop server that answers any request with a small JSON echo.

The benchmark measures it with the same client, requests and concurrency as the sidecar, so
"sidecar / bare" is what tierproxy costs on top of the HTTP stack it is built on. It parses
the JSON body with orjson (as the sidecar does) and turns off the access log (as the sidecar
does); it does nothing else.

    python loadtests/bare_server.py --port 8760
"""

from __future__ import annotations

import argparse

import orjson
import uvloop
from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    data = orjson.loads(body) if body else None
    return web.Response(body=orjson.dumps({"ok": True, "echo": data}),
                        content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ready":true}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/readyz", ready, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.install()
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None,
                print=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
