"""Saturation throughput with wrk: the most requests a server answers at a given number of
connections, with a client that costs far less CPU than a Python one (on a 2-core machine
the client shares the cores with the server, so a cheap client measures the server).

wrk runs `wrk_load.lua`, which rotates the requests over `keys` paths and puts a unique
message id into each body (idempotency keys never collide), and prints its counts and
latency percentiles as JSON. `run_wrk` runs an unmeasured warm-up first, then the measured
run, sampling the servers' CPU meanwhile; `write_backlog` sends a given number of requests
as fast as the server takes them (a backlog for the flusher to drain).

wrk is the Debian package `wrk`; `make wrk` installs it when `command -v wrk` fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import harness
import orjson
from harness import HarnessError, Target
from procs import TreeMeter

SCRIPT = harness.HERE / "wrk_load.lua"
_RESULT = "wrk-result "
_LIMIT = "wrk-limit"
_RUNS = itertools.count()
_TIMEOUT_S = 10  # wrk's per-request timeout: slower answers count as timeouts


@dataclass(frozen=True)
class WrkSpec:
    method: str
    path: str  # `{k}` becomes request number % keys
    keys: int = 1
    body: str = ""  # `{n}` becomes a unique message id
    connections: int = 32
    threads: int = 1  # wrk threads; one is plenty for a Python server and leaves it a core
    duration_s: float = 5.0
    warmup_s: float = 1.0


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise HarnessError("wrk not found: run `make wrk` (Debian: apt-get install -y wrk)")
    return found


def command(target: Target, spec: WrkSpec, duration_s: float, limit: int = 0) -> list[str]:
    """The wrk command line for one run; ids are unique to this process and run."""
    headers = {**target.headers, **({"Content-Type": "application/json"} if spec.body else {})}
    prefix = f"{target.name}-{os.getpid()}-{next(_RUNS)}"
    argv = [wrk_binary(), "-t", str(spec.threads), "-c", str(spec.connections),
            "-d", f"{max(duration_s, 1.0):g}s", "--timeout", f"{_TIMEOUT_S}s",
            "-s", str(SCRIPT)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, target.url, "--", spec.method, spec.path, str(spec.keys), spec.body,
            prefix, str(limit)]


def parse(stdout: str, argv: Sequence[str]) -> dict[str, Any]:
    """wrk's result line as figures: rps, latency percentiles in ms, requests, errors."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_RESULT)), None)
    if line is None:
        raise HarnessError(f"wrk printed no result ({' '.join(argv)}):\n{stdout[-2000:]}")
    raw = orjson.loads(line.removeprefix(_RESULT))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors",
                                  "status_errors", "timeout_errors"))
    out: dict[str, Any] = {"requests": raw["requests"], "errors": errors, "duration_s": seconds,
                           "rps": (raw["requests"] - errors) / seconds if seconds else 0.0,
                           "error_kinds": {k: raw[k] for k in raw
                                           if k.endswith("_errors") and raw[k]}}
    for q in ("p50", "p90", "p99", "p999", "max", "mean"):
        out[f"{q}_ms"] = raw[f"{q}_us"] / 1000
    return out


def _run(argv: list[str]) -> tuple[str, float]:
    """Run wrk to the end; (stdout, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=float(argv[argv.index("-d") + 1][:-1]) + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise HarnessError(f"wrk failed (exit {done.returncode}): {done.stderr[-2000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, cpu_s


def run_wrk(target: Target, spec: WrkSpec) -> dict[str, Any]:
    """Warm up, then one measured run; its figures plus `cpu_pct` (% of one core per server
    process tree, the client and others) and `cpu_s` (CPU seconds per tree)."""
    if spec.warmup_s > 0:
        _run(command(target, spec, spec.warmup_s))
    argv = command(target, spec, spec.duration_s)
    meter = TreeMeter(target.cpu_pids)
    meter.start()
    stdout, client_s = _run(argv)
    cpu = meter.stop()
    result = parse(stdout, argv)
    client = round(100.0 * client_s / max(result["duration_s"], 1e-9), 1)
    cpu = harness.with_others(cpu, client)
    cpu["client"] = client
    return {**result, "target": target.name, "cpu_pct": cpu, "cpu_s": meter.cpu_s}


def write_backlog(target: Target, spec: WrkSpec, total: int,
                  timeout_s: float = 600.0) -> dict[str, Any]:
    """Send `total` requests (each wrk thread its share) as fast as the server answers, and
    return wrk's figures. wrk runs for a fixed time, so each thread reports when it has its
    share and wrk is interrupted (SIGINT: it stops and prints its results) once all have."""
    spec = dataclasses.replace(spec, warmup_s=0.0)
    share = -(-total // spec.threads)
    argv = command(target, spec, timeout_s, limit=share)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        lines, finished = [], 0
        for line in proc.stdout:
            lines.append(line)
            finished += line.strip() == _LIMIT
            if finished == spec.threads:
                proc.send_signal(signal.SIGINT)
        code = proc.wait()
        stderr = proc.stderr.read()
    if code != 0:
        raise HarnessError(f"wrk failed (exit {code}): {stderr[-2000:]}")
    return parse("".join(lines), argv)
