"""`tierproxy serve` on the embedded default, end to end: it starts its own servers, serves,
stops them on SIGTERM, and a restart on the same data directory keeps the data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from proxy.embedded import free_port
from tests.conftest import Servers
from tests.sidecar import ROOT

pytestmark = pytest.mark.timeout(180)


def _serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--data-dir", str(data_dir), "--port",
             str(port), "--metrics-port", str(free_port())],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_listening(proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while "listening on" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def _request(method: str, url: str, doc: object | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(doc).encode() if doc is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def _children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def test_serve_embedded_restart_keeps_data(tmp_path: Path) -> None:
    data_dir, log, port = tmp_path / "data", tmp_path / "serve.log", free_port()
    proc = _serve(data_dir, port, log)
    try:
        _wait_listening(proc, log)
        base = f"http://127.0.0.1:{port}"
        assert _request("PUT", f"{base}/v1/threads/t1", {"title": "kept"})[0] == 201
        status, msg = _request("POST", f"{base}/v1/threads/t1/messages",
                               {"role": "user", "content": "hello"})
        assert status == 201 and msg["seq"] == 1
        redis_children = [p for p in _children(proc) if "redis-server" in p.name()]
        assert redis_children, "the embedded redis-server runs as a child"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        psutil.wait_procs(redis_children, timeout=10)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                       for p in redis_children)
    finally:
        if proc.poll() is None:
            proc.kill()

    log = tmp_path / "restart.log"
    proc = _serve(data_dir, port, log)
    try:
        _wait_listening(proc, log)
        status, thread = _request("GET", f"http://127.0.0.1:{port}/v1/threads/t1")
        assert status == 200 and thread["title"] == "kept" and thread["last_seq"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    _stop_leftover_postgres(data_dir)


def _stop_leftover_postgres(data_dir: Path) -> None:
    """PostgreSQL is daemonised by pg_ctl; `serve` stops it, but make sure in any case."""
    from proxy.embedded import PostgresServer

    PostgresServer(data_dir / "postgres").stop()


def test_bad_config_exits_naming_the_key(tmp_path: Path) -> None:
    env = {**os.environ, "TIERPROXY_FLUSH_MAX_BATCH": "-1"}
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--data-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert b"flush.max_batch" in done.stderr
    assert not (tmp_path / "redis").exists()  # nothing was started


def test_migrate_command_applies_the_schema_idempotently(servers: Servers) -> None:
    env = {**os.environ, "TIERPROXY_POSTGRES_URL": servers.postgres_url}
    for _ in range(2):  # a second run finds everything in place
        done = subprocess.run([sys.executable, "-m", "proxy", "migrate"], cwd=ROOT, env=env,
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert b"schema is up to date" in done.stderr


def test_migrate_without_a_url_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    done = subprocess.run([sys.executable, "-m", "proxy", "migrate"], cwd=ROOT, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 2 and b"postgres.url is empty" in done.stderr
