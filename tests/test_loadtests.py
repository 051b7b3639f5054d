"""The load scripts work end to end: the bench on its own embedded servers, `make loadtest`'s
runner (Locust against the embedded default, with a token). Only that they complete, count
requests without errors and report their figures: timings on a shared CI machine prove
nothing, so none are asserted."""

from __future__ import annotations

import csv
import importlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"
TOKEN = "locust-smoke-token"
MODULES = ("harness", "bench", "loadgen", "observe", "procs", "table", "loadtest",
           "changes_resume", "redis_profile")
# Each kind of measurement, briefly: wrk against every baseline, the paused-flusher drain,
# ack -> PostgreSQL/ClickHouse, WebSocket delivery on two sidecars, CPU per append (loadgen
# open loop) and memory. The other scenarios run the same code on other requests and rates.
SMOKE = ("append", "pg_flush", "ack_to_commit", "ws_delivery", "append_cpu", "memory")


@pytest.fixture(scope="module")
def loadtests() -> Iterator[dict[str, ModuleType]]:
    """The scripts import each other as top-level modules (they run as `python loadtests/x.py`)."""
    sys.path.insert(0, str(LOADTESTS))
    try:
        yield {name: importlib.import_module(name) for name in MODULES}
    finally:
        sys.path.remove(str(LOADTESTS))


def test_combine_takes_medians_and_sums_counts(loadtests: dict[str, ModuleType]) -> None:
    runs = [{"rps": 1.0, "sidecar_errors": 1.0}, {"rps": 3.0, "sidecar_errors": 0.0},
            {"rps": 2.0, "sidecar_errors": 2.0}]
    assert loadtests["bench"].combine(runs) == {"rps": 2.0, "sidecar_errors": 3.0}
    assert loadtests["loadgen"].percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


def test_bucket_quantile_interpolates_inside_a_bucket(loadtests: dict[str, ModuleType]) -> None:
    observe = loadtests["observe"]
    before = {0.01: 10.0, 0.1: 10.0, float("inf"): 10.0}
    after = {0.01: 10.0, 0.1: 110.0, float("inf"): 110.0}  # 100 new, all in (0.01, 0.1]
    assert observe.bucket_quantile(before, after, 0.5) == pytest.approx(0.055)
    assert math.isnan(observe.bucket_quantile(after, after, 0.5))  # nothing observed
    text = 'x_total{sink="pg"} 3.0\nx_total{sink="ch"} 5.0\n'
    assert observe.counter_value(text, "x_total", "pg") == 3.0


def test_table_row_shows_baseline_ratio_and_verdict(loadtests: dict[str, ModuleType]) -> None:
    table = loadtests["table"]
    line = table.Line("append throughput", "sidecar_rps", "req/s", "bare_rps", "ceiling",
                      "ratio")
    check = table.Check("ratio", ">=", 0.5, "append >= 50% of the ceiling")
    figures = {"sidecar_rps": 4500.0, "bare_rps": 9000.0, "ratio": 0.5}
    assert table.row("append", line, figures, [check]) == [
        "append", "append throughput", "4,500 req/s", "ceiling 9,000 req/s", "0.50×", "≥ 0.5×",
        "PASS"]
    diff = table.Line("p99", "s_p99", "ms", "b_p99", "ceiling", "added", "ms")
    late = table.Check("added", "<=", 1.5, "p99 added <= 1.5 ms")
    cells = table.row("x", diff, {"s_p99": 3.0, "b_p99": 1.0, "added": 2.0}, [late])
    assert cells[4:] == ["+2.00 ms", "≤ +1.5 ms", "**FAIL**"]


def test_tree_meter_counts_children_born_during_the_run(loadtests: dict[str, ModuleType],
                                                        tmp_path: Path) -> None:
    """A child started after start() (a worker the supervisor respawned) is measured."""
    go = tmp_path / "go"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, subprocess, sys, time\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        "subprocess.run([sys.executable, '-c', 'sum(range(10_000_000))'])\n")])
    try:
        meter = loadtests["procs"].TreeMeter({"tree": parent.pid}, interval_s=0.01)
        meter.start()
        go.touch()
        parent.wait(timeout=30)
        meter.stop()
    finally:
        parent.kill()
        parent.wait()
    assert meter.processes() >= 2
    assert meter.cpu_s["tree"] > 0


def test_bench_runs_every_kind_of_scenario(loadtests: dict[str, ModuleType],
                                           tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    only = [arg for name in SMOKE for arg in ("--only", name)]
    code = loadtests["bench"].main(["--duration", "1", "--warmup", "0", "--repetitions", "1",
                                    "--rate", "200", "--backlog", "1000", "--out", str(out),
                                    *only])
    assert code == 0
    doc = json.loads(out.read_text())
    s = {name: doc["scenarios"][name]["median"] for name in SMOKE}
    for target in ("bare", "sidecar", "oldway", "oldway_slow"):
        assert s["append"][f"{target}_requests"] > 0, target
        assert s["append"][f"{target}_errors"] == 0, target
    flush = s["pg_flush"]
    assert flush["insert_rows"] > 0 and flush["drain_rows"] >= 1000, flush
    assert flush["backlog_errors"] == 0 and flush["missing_errors"] == 0, flush
    ack = s["ack_to_commit"]
    assert ack["sidecar_errors"] == 0 and ack["invisible_errors"] == 0, ack
    assert ack["visible_samples"] > 0 and ack["ch_visible_samples"] > 0, ack
    ws = s["ws_delivery"]
    assert ws["frames_received"] > 0 and ws["write_errors"] == 0 and ws["order_errors"] == 0
    assert ws["resubscribe_errors"] == 0, ws
    assert s["append_cpu"]["sidecar_us_per_append"] > 0
    assert s["memory"]["api_rss_mb"] > 0
    checked = {c["figure"] for r in doc["scenarios"].values() for c in r["checks"]}
    assert {"ratio", "oldway_ratio", "drain_speedup", "visible_p99_ms",
            "ch_visible_p99_ms", "ack_to_push_p99_ms", "sidecar_us_per_append",
            "api_rss_mb"} <= checked
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") >= 10 and "| pg_flush |" in table


def test_loadtest_runs_locust_on_the_embedded_default(loadtests: dict[str, ModuleType],
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERPROXY_API_TOKEN", TOKEN)  # the sidecar and Locust both get it
    code = loadtests["loadtest"].main(["--users", "5", "--spawn-rate", "5", "--run-time", "4s",
                                       "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "report.html").stat().st_size > 0
    with open(tmp_path / "tierproxy_stats.csv", newline="") as f:
        rows: dict[str, dict[str, Any]] = {f"{r['Type']} {r['Name']}": r
                                           for r in csv.DictReader(f)}
    assert int(rows["POST POST /v1/threads/[tid]/messages"]["Request Count"]) > 0
    for ws in ("WS connect", "WS subscribe", "WS message.created"):
        assert int(rows[ws]["Request Count"]) > 0, rows.keys()
    assert int(rows[" Aggregated"]["Failure Count"]) == 0, rows[" Aggregated"]


def test_changes_resume_replays_every_change_once(loadtests: dict[str, ModuleType],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtests["changes_resume"].main(["--creates", "20"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["edits"], got["deletes"], got["expected"], got["replayed"]) == (10, 5, 20, 20)
    assert got["duplicates"] == got["missing"] == got["out_of_order"] == 0
    assert got["catch_up_ms"] > 0


def test_redis_profile_splits_redis_time_by_script(loadtests: dict[str, ModuleType],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtests["redis_profile"].main(["--rate", "100", "--duration", "1"]) == 0
    out = capsys.readouterr().out
    assert "µs per append" in out and "message_append.lua" in out, out
