"""Command line: `tierproxy serve` and `tierproxy migrate`. The only module that reads argv
and the environment (through settings.load) and installs uvloop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web

from proxy import failpoints, topology, tracing
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
    serve.add_argument("--role", choices=("all", "api", "worker"), default="all",
                       help="all: API processes and the worker (default); api: API processes "
                            "only; worker: the background work only, in this process")
    serve.add_argument("--workers", default="1", type=_workers,
                       help="API processes sharing the API port (default 1; auto: one per "
                            "usable core; 0: API and background work in this one process)")
    serve.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    migrate = sub.add_parser("migrate", help="create or upgrade the PostgreSQL schema")
    migrate.add_argument("--config", type=Path)
    return parser.parse_args(argv)


def _workers(value: str) -> str:
    if value == "auto" or (value.isdigit() and int(value) <= 64):
        return value
    raise argparse.ArgumentTypeError(f"--workers must be a number from 0 to 64 or auto, "
                                     f"not {value!r}")


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
        if ids := tracing.current_ids():
            entry["trace_id"], entry["span_id"] = ids
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
    role = args.role if args.child or args.role == "worker" else "supervisor"
    try:
        tracing.setup("tierproxy", {"tierproxy.role": role})
    except ConfigError as e:
        sys.exit(f"tierproxy: config error: {e}")
    try:
        sys.exit(serve(s, args))
    finally:
        tracing.shutdown()


async def _migrate(s: Settings) -> int:
    from proxy.backends.postgres import migrate

    if not s.postgres.url:
        logger.error("postgres.url is empty: nothing to migrate (set TIERPROXY_POSTGRES_URL)")
        return 2
    await migrate(s.postgres.url)
    return 0


def serve(s: Settings, args: argparse.Namespace) -> int:
    """A child of a supervisor runs its role; else start embedded servers for the URLs left
    empty (in this thread: they die with it), then supervise the processes (or, with
    `--role worker` or `--workers 0`, run everything in this one) until SIGTERM/SIGINT."""
    if args.child:
        return asyncio.run(_serve_child(s, args.role))
    try:
        from proxy.embedded import EmbeddedServers

        embedded = EmbeddedServers(Path(s.data.dir), redis=not s.redis.url,
                                   postgres=not s.postgres.url, clickhouse=not s.clickhouse.url)
        embedded.start()
    except Exception as e:  # a server that cannot start is fatal; say which and why
        logger.error("embedded servers failed to start: %s", e)
        return 1
    try:
        s = s.replace("redis", url=s.redis.url or embedded.redis_url)
        s = s.replace("postgres", url=s.postgres.url or embedded.postgres_url)
        s = s.replace("clickhouse", url=s.clickhouse.url or embedded.clickhouse_url)
        workers = usable_cores() if args.workers == "auto" else int(args.workers)
        if args.role == "worker" or workers == 0:
            if not s.worker.socket:  # alone, the API and the worker meet in the data dir
                s = s.replace("worker", socket=str(Path(s.data.dir).resolve() / "worker.sock"))
            return asyncio.run(_serve_alone(s, args.role))
        from proxy.supervisor import Supervisor

        env = {**os.environ, "TIERPROXY_REDIS_URL": s.redis.url,
               "TIERPROXY_POSTGRES_URL": s.postgres.url,
               "TIERPROXY_CLICKHOUSE_URL": s.clickhouse.url}
        return asyncio.run(Supervisor(s, args.role, workers, _passed_on(args), env).run())
    finally:
        embedded.stop()


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    return cores


def _passed_on(args: argparse.Namespace) -> list[str]:
    """The command line options a child gets again."""
    out: list[str] = []
    for flag, value in (("--config", args.config), ("--host", args.host),
                        ("--port", args.port), ("--metrics-port", args.metrics_port),
                        ("--data-dir", args.data_dir)):
        if value is not None:
            out += [flag, str(value)]
    return out


async def _serve_child(s: Settings, role: str) -> int:
    """An API process (on the shared API port) or the worker (on its socket)."""
    from proxy.app import create_app

    app = create_app(s, role)
    runner = web.AppRunner(app, shutdown_timeout=s.shutdown.deadline_s, handle_signals=False,
                           access_log=None)
    if role == "api":
        return await _run(s, app, [runner], [
            lambda: web.TCPSite(runner, s.api.host, s.api.port, reuse_port=True)])
    # The worker's final flush comes once the API processes have stopped (the supervisor
    # says so with SIGUSR1), so it takes their last writes; both within the one deadline.
    apis_done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, apis_done.set)
    return await _run(s, app, [runner], [lambda: web.UnixSite(runner, s.worker.socket)],
                      before_stop=apis_done)


async def _serve_alone(s: Settings, role: str) -> int:
    """Everything of `role` in this process, with the metrics port of its own."""
    from proxy.app import create_app, create_metrics_app

    app = create_app(s, role)
    runner = web.AppRunner(app, shutdown_timeout=s.shutdown.deadline_s, handle_signals=False,
                           access_log=None)
    metrics = web.AppRunner(create_metrics_app(app), access_log=None)
    main_site: Any = (lambda: web.UnixSite(runner, s.worker.socket)) if role == "worker" else \
        (lambda: web.TCPSite(runner, s.api.host, s.api.port))
    return await _run(s, app, [runner, metrics], [
        main_site, lambda: web.TCPSite(metrics, s.metrics.host, s.metrics.port)], announce=True)


async def _run(s: Settings, app: web.Application, runners: list[web.AppRunner],
               sites: list[Any], announce: bool = False,
               before_stop: asyncio.Event | None = None) -> int:
    """Set up, listen, wait for SIGTERM/SIGINT, then stop in reverse (once `before_stop` is
    set, if given, or the deadline passed)."""
    from proxy.app import HEALTH

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for runner in runners:
            await runner.setup()
        for site in sites:
            await site().start()
    except Exception as e:  # e.g. Redis unsafe, port taken
        logger.error("startup failed: %s", e)
        await _cleanup(*runners)
        return 1
    # What startup made (modules, settings, scripts, pools) lives as long as the process: out
    # of the collector's sight, so a full collection scans only what requests made since.
    gc.collect()
    gc.freeze()
    if announce:
        print(f"tierproxy listening on http://{s.api.host}:{s.api.port} "
              f"(metrics on http://{s.metrics.host}:{s.metrics.port}/metrics)", flush=True)
    await stop.wait()
    logger.info("shutting down: draining requests, final flush (deadline %.0f s)",
                s.shutdown.deadline_s)
    started = time.monotonic()
    app[HEALTH].drain()  # the deadline counts from here
    if before_stop is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(s.shutdown.deadline_s):
                await before_stop.wait()
    await _cleanup(*runners)
    logger.info("%6.2fs stopped", time.monotonic() - started)
    return 0


async def _cleanup(*runners: web.AppRunner) -> None:
    for runner in runners:
        with contextlib.suppress(Exception):
            await runner.cleanup()
