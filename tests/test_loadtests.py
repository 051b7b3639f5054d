"""The load scripts work end to end: the bench on its own embedded servers, Locust against a
sidecar with a token. Only that they complete and count requests without errors: timings
on a shared CI machine prove nothing, so none are asserted."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"
LOCUST = Path(sys.executable).parent / "locust"
TOKEN = "locust-smoke-token"


@pytest.fixture(scope="module")
def loadtests() -> Iterator[dict[str, ModuleType]]:
    """The scripts import each other as top-level modules (they run as `python loadtests/x.py`)."""
    sys.path.insert(0, str(LOADTESTS))
    try:
        yield {name: importlib.import_module(name) for name in ("harness", "bench", "loadgen")}
    finally:
        sys.path.remove(str(LOADTESTS))


def test_combine_takes_medians_and_sums_counts(loadtests: dict[str, ModuleType]) -> None:
    runs = [{"rps": 1.0, "sidecar_errors": 1.0}, {"rps": 3.0, "sidecar_errors": 0.0},
            {"rps": 2.0, "sidecar_errors": 2.0}]
    assert loadtests["bench"].combine(runs) == {"rps": 2.0, "sidecar_errors": 3.0}
    assert loadtests["loadgen"].percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


def test_bench_append_runs_end_to_end(loadtests: dict[str, ModuleType], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    code = loadtests["bench"].main(["--duration", "1", "--warmup", "0.2", "--repetitions", "1",
                                    "--only", "append", "--out", str(out)])
    assert code == 0
    append = json.loads(out.read_text())["scenarios"]["append"]
    for target in ("bare", "sidecar"):
        assert append["median"][f"{target}_requests"] > 0, target
        assert append["median"][f"{target}_errors"] == 0, target
    assert {c["figure"] for c in append["checks"]} == {"ratio"}


def test_bench_flush_scenarios_run_end_to_end(loadtests: dict[str, ModuleType],
                                              tmp_path: Path) -> None:
    """pg_flush stops and restarts PostgreSQL under the sidecar; everything acknowledged
    meanwhile must land. ack_to_commit follows sampled appends into PostgreSQL."""
    out = tmp_path / "results.json"
    code = loadtests["bench"].main(["--duration", "1", "--warmup", "0.2", "--repetitions", "1",
                                    "--only", "pg_flush", "--only", "ack_to_commit",
                                    "--out", str(out)])
    assert code == 0
    scenarios = json.loads(out.read_text())["scenarios"]
    flush = scenarios["pg_flush"]["median"]
    assert flush["insert_rows"] > 0 and flush["upsert_rows"] > 0
    assert flush["drain_rows"] >= 1000
    assert flush["drain_write_errors"] == 0 and flush["missing_errors"] == 0, flush
    assert {c["figure"] for c in scenarios["pg_flush"]["checks"]} == {"flowing_speedup"}
    ack = scenarios["ack_to_commit"]["median"]
    assert ack["sidecar_requests"] > 0 and ack["sidecar_errors"] == 0, ack
    assert ack["visible_samples"] > 0 and ack["invisible_errors"] == 0, ack
    assert ack["pg_hist_count"] > 0, ack


def test_bucket_quantile_interpolates_inside_a_bucket(loadtests: dict[str, ModuleType]) -> None:
    flush = importlib.import_module("flush_scenarios")
    before = {0.01: 10.0, 0.1: 10.0, float("inf"): 10.0}
    after = {0.01: 10.0, 0.1: 110.0, float("inf"): 110.0}  # 100 new, all in (0.01, 0.1]
    assert flush.bucket_quantile(before, after, 0.5) == pytest.approx(0.055)
    assert math.isnan(flush.bucket_quantile(after, after, 0.5))  # nothing observed
    text = 'x_total{sink="pg"} 3.0\nx_total{sink="ch"} 5.0\n'
    assert flush.counter_value(text, "x_total", "pg") == 3.0


@pytest.fixture(scope="module")
def sidecar_url(loadtests: dict[str, ModuleType]) -> Iterator[str]:
    with loadtests["harness"].temporary_stack(token=TOKEN, bare=False) as stack:
        yield stack.sidecar.url


def test_locust_mix_runs_against_a_sidecar(sidecar_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "TIERPROXY_API_TOKEN": TOKEN}
    done = subprocess.run(
        [str(LOCUST), "-f", str(LOADTESTS / "locustfile.py"), "--headless", "-u", "2", "-r", "2",
         "-t", "3s", "--host", sidecar_url, "--json", "--skip-log"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stats: list[dict[str, Any]] = json.loads(done.stdout)
    assert sum(s["num_requests"] for s in stats) > 0
    assert sum(s["num_failures"] for s in stats) == 0, stats
