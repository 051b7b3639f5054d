"""`make loadtest`: Locust headless against `tierproxy serve` on the embedded default.

    python loadtests/loadtest.py --users 50 --spawn-rate 10 --run-time 60s

Starts `tierproxy serve` with no database URLs (it starts its own Redis, PostgreSQL and chDB)
in a temporary data directory, runs Locust headless with loadtests/locustfile.py (the chat
mix, WebSocket subscribers included) for a bounded time, writes its CSV and HTML reports
(default .bench/locust/tierproxy_*.csv and .bench/locust/report.html), stops the sidecar and
removes the directory. The exit code is Locust's: 1 when a request failed.

TIERPROXY_* variables of the caller's shell are not passed on (this measures the embedded
default), except TIERPROXY_API_TOKEN, which the sidecar and the locustfile then both use.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import harness

from proxy.embedded import free_port

LOCUST = Path(sys.executable).parent / "locust"
LOCUSTFILE = harness.HERE / "locustfile.py"
OUT = harness.REPO / ".bench" / "locust"
STARTUP_S = 120.0  # a first start initialises PostgreSQL's data directory


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest.py", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=50, help="concurrent Locust users")
    p.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    p.add_argument("--run-time", default="60s", help="how long, e.g. 60s or 2m")
    p.add_argument("--out", type=Path, default=OUT, help="directory of the reports")
    return p.parse_args(argv)


def sidecar_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    if token := os.environ.get("TIERPROXY_API_TOKEN"):
        env["TIERPROXY_API_TOKEN"] = token
    return env | {"TIERPROXY_LOG_LEVEL": "warning"}


def locust(url: str, a: argparse.Namespace) -> int:
    a.out.mkdir(parents=True, exist_ok=True)
    argv = [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", str(a.users),
            "-r", f"{a.spawn_rate:g}", "-t", a.run_time, "--host", url, "--only-summary",
            "--csv", str(a.out / "tierproxy"), "--html", str(a.out / "report.html")]
    print(" ".join(argv), flush=True)
    return subprocess.run(argv, cwd=harness.REPO, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tierproxy-loadtest-",
                                     ignore_cleanup_errors=True) as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = harness.Service(
            "tierproxy serve", [sys.executable, "-m", "proxy", "serve", "--port", str(port),
                                "--metrics-port", str(free_port()), "--data-dir", tmp],
            Path(tmp) / "sidecar.log", f"{url}/readyz", sidecar_env(), ready_timeout_s=STARTUP_S)
        print(f"starting tierproxy serve (embedded default) under {tmp}", flush=True)
        serve.start()
        try:
            code = locust(url, a)
        finally:
            serve.stop()
    print(f"reports: {a.out / 'tierproxy_stats.csv'} (and _history, _failures, _exceptions), "
          f"{a.out / 'report.html'}")
    return code


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
