"""A real sidecar in a subprocess (`python -m proxy serve`), for crash and multi-process tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil

from proxy.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


class Sidecar:
    def __init__(self, data_dir: Path, redis_url: str, postgres_url: str, clickhouse_url: str,
                 **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = data_dir / f"sidecar-{self.port}.log"
        self._env = {
            **os.environ, "TIERPROXY_REDIS_URL": redis_url, "TIERPROXY_POSTGRES_URL": postgres_url,
            "TIERPROXY_CLICKHOUSE_URL": clickhouse_url, "TIERPROXY_REDIS_SHARDS": "4",
            "TIERPROXY_FLUSH_MAX_DELAY_MS": "10", "TIERPROXY_FLUSH_CLAIM_IDLE_MS": "1500",
            "TIERPROXY_FLUSH_BACKOFF_MAX_MS": "300", "TIERPROXY_FLUSH_TRIM_INTERVAL_S": "0.2",
            "TIERPROXY_CIRCUIT_OPEN_S": "0.3", "TIERPROXY_CLICKHOUSE_INTERVAL_MS": "100",
            "TIERPROXY_SHUTDOWN_DEADLINE_S": "5", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0, ready: bool = True) -> Sidecar:
        """Start it (its supervisor, which starts the rest); with `ready`, return once it is."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--port", str(self.port),
                 "--metrics-port", str(self.metrics_port), "--data-dir", str(self.data_dir)],
                cwd=ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT)
        if ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"sidecar not ready within {timeout_s} s:\n{self.logs()}")

    def logs(self, tail: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9 of the whole sidecar (its supervisor, API processes and worker): no
        cleanup, no final flush; returns once every process of it is gone."""
        if self.proc and self.proc.poll() is None:
            family = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.kill()
            for child in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            psutil.wait_procs(family, timeout=10)
        self.wait()

    def processes(self, role: str) -> list[psutil.Process]:
        """The sidecar's live processes of a role (api or worker)."""
        assert self.proc is not None
        found = []
        for p in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                if p.status() != psutil.STATUS_ZOMBIE and p.cmdline()[-2:] == ["--role", role]:
                    found.append(p)
        return found

    def exits(self, role: str) -> list[int]:
        """The exit codes the supervisor logged for processes of `role` (api, worker)."""
        return [int(code) for code in re.findall(rf"{role} process \d+ exited with (-?\d+)",
                                                 self.logs(10**7))]

    async def worker_killed(self) -> bool:
        """Its worker process died of SIGKILL (a failpoint crash; the supervisor restarts it,
        so the sidecar itself lives on: tests then kill it)."""
        return -signal.SIGKILL in self.exits("worker")

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30.0) -> int | None:
        return self.proc.wait(timeout_s) if self.proc else None

    def stop(self) -> None:
        self.terminate()
        try:
            self.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


_CH_QUERY = """
import sys, orjson, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
rows = client.query(sys.argv[2]).result_rows
sys.stdout.write("\\n" + orjson.dumps([list(r) for r in rows], default=str).decode() + "\\n")
"""


def clickhouse_query(url: str, sql: str, timeout_s: float = 60.0) -> list[list[Any]]:
    """Rows of a query on a sidecar's ClickHouse. A chDB directory is open to one process at
    a time (and this one has its own engine), so a subprocess asks; stop the sidecar first."""
    done = subprocess.run([sys.executable, "-c", _CH_QUERY, url, sql], cwd=ROOT,
                          capture_output=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"clickhouse query failed: {done.stderr.decode(errors='replace')}")
    rows: list[list[Any]] = orjson.loads(done.stdout.splitlines()[-1])
    return rows
