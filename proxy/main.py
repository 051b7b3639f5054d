"""Command line: `tierproxy serve` and `tierproxy migrate`. The only module that reads argv
and the environment (through settings.load) and installs uvloop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import orjson
import uvloop
from aiohttp import web

from proxy import failpoints, topology
from proxy import settings as config
from proxy.backends import SINKS
from proxy.settings import ConfigError, Settings

logger = logging.getLogger("proxy")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tierproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (embedded servers if no URLs are set)")
    serve.add_argument("--config", type=Path, help="TOML file overriding config/default.toml")
    serve.add_argument("--host", help="API address (api.host)")
    serve.add_argument("--port", type=int, help="API port (api.port)")
    serve.add_argument("--metrics-port", type=int, help="metrics port (metrics.port)")
    serve.add_argument("--data-dir", help="embedded servers' data directory (data.dir)")
    migrate = sub.add_parser("migrate", help="create or upgrade the PostgreSQL schema")
    migrate.add_argument("--config", type=Path)
    return parser.parse_args(argv)


def load_settings(args: argparse.Namespace) -> Settings:
    s = config.load(args.config)
    overrides = {("api", "host"): getattr(args, "host", None),
                 ("api", "port"): getattr(args, "port", None),
                 ("metrics", "port"): getattr(args, "metrics_port", None),
                 ("data", "dir"): getattr(args, "data_dir", None)}
    for (section, key), value in overrides.items():
        if value is not None:
            s = s.replace(section, **{key: value})
    try:
        failpoints.parse(s.debug.failpoint)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if s.redis.url:
        try:
            topology.parse(s.redis.url)
        except ValueError as e:
            raise ConfigError(f"redis.url: {e}") from e
    known = {sink.name for sink in SINKS}
    for name in s.flush.sink_names:
        if name not in known:
            raise ConfigError(f"flush.sinks: unknown sink {name!r} (known: "
                              f"{', '.join(sorted(known))})")
    return s


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(s: Settings) -> None:
    handler = logging.StreamHandler()
    if s.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=s.log.level.upper(), handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        s = load_settings(args)
    except ConfigError as e:
        sys.exit(f"tierproxy: config error: {e}")
    setup_logging(s)
    uvloop.install()
    if args.command == "migrate":
        sys.exit(asyncio.run(_migrate(s)))
    sys.exit(serve(s))


async def _migrate(s: Settings) -> int:
    from proxy.backends.postgres import migrate

    if not s.postgres.url:
        logger.error("postgres.url is empty: nothing to migrate (set TIERPROXY_POSTGRES_URL)")
        return 2
    await migrate(s.postgres.url)
    return 0


def serve(s: Settings) -> int:
    """Start embedded servers for the URLs left empty (in this thread: they die with it), then
    run the API and metrics servers until SIGTERM/SIGINT."""
    from proxy.embedded import EmbeddedServers

    embedded = EmbeddedServers(Path(s.data.dir), redis=not s.redis.url,
                               postgres=not s.postgres.url, clickhouse=not s.clickhouse.url)
    try:
        embedded.start()
    except Exception as e:  # a server that cannot start is fatal; say which and why
        logger.error("embedded servers failed to start: %s", e)
        return 1
    try:
        s = s.replace("redis", url=s.redis.url or embedded.redis_url)
        s = s.replace("postgres", url=s.postgres.url or embedded.postgres_url)
        s = s.replace("clickhouse", url=s.clickhouse.url or embedded.clickhouse_url)
        return asyncio.run(_serve(s))
    finally:
        embedded.stop()


async def _serve(s: Settings) -> int:
    from proxy.app import create_app, create_metrics_app

    app = create_app(s)
    runner = web.AppRunner(app, shutdown_timeout=s.shutdown.deadline_s, handle_signals=False,
                           access_log=None)
    metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        await metrics_runner.setup()
        await web.TCPSite(runner, s.api.host, s.api.port).start()
        await web.TCPSite(metrics_runner, s.metrics.host, s.metrics.port).start()
    except Exception as e:  # e.g. Redis unreachable or unsafe, port taken
        logger.error("startup failed: %s", e)
        await _cleanup(runner, metrics_runner)
        return 1
    print(f"tierproxy listening on http://{s.api.host}:{s.api.port} "
          f"(metrics on http://{s.metrics.host}:{s.metrics.port}/metrics)", flush=True)
    await stop.wait()
    logger.info("shutting down: draining requests, final flush (deadline %.0f s)",
                s.shutdown.deadline_s)
    started = time.monotonic()
    await _cleanup(runner, metrics_runner)
    logger.info("%6.2fs stopped", time.monotonic() - started)
    return 0


async def _cleanup(*runners: web.AppRunner) -> None:
    for runner in runners:
        with contextlib.suppress(Exception):
            await runner.cleanup()
