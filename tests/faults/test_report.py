"""The fault matrix renderer (report.py): only the marked block of RELIABILITY.md changes, a
failed or lossy scenario stands out, and the records file is read as the suite wrote it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from tests.faults import report
from tests.faults.report import BEGIN, COLUMNS, END, Run, load, render, replace_block
from tests.faults.results import ENV, Outcome, recording, write

RUN = Run("2025-01-02 03:04:05 UTC", "`abc1234` (a commit)", "Linux, 2 cores")


def record(scenario: str, **figures: Any) -> dict[str, Any]:
    outcome = Outcome(f"tests/faults/test_x.py::test_{scenario.replace(' ', '_')}")
    outcome.describe(scenario, faults_md=figures.pop("faults_md", 1),
                     recovery="restart -> drained")
    fields = {"acknowledged": 100, "refused": 0, "unknown": 0, "lost": 0, "duplicated": 0,
              "regressed": 0, "recovery_s": 1.5, "passed": True,
              "finished": "2025-01-02T03:04:05+00:00", **figures}
    return dataclasses.asdict(dataclasses.replace(outcome, **fields))


def row_of(markdown: str, scenario: str) -> dict[str, str]:
    """The table row of a scenario, by column name."""
    [line] = [line for line in markdown.splitlines()
              if line.startswith("| ") and f" {scenario} |" in line]
    return dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split(" | ")), strict=True))


def test_only_the_block_between_the_markers_is_replaced() -> None:
    doc = f"# Reliability\n\nprose above\n\n{BEGIN}\nold matrix\n{END}\n\nprose below\n"
    out = replace_block(doc, "new matrix")
    assert out == f"# Reliability\n\nprose above\n\n{BEGIN}\nnew matrix\n{END}\n\nprose below\n"
    assert replace_block(out, "new matrix") == out  # a second run changes nothing more


@pytest.mark.parametrize("doc", ["no markers", f"{END}\n{BEGIN}", f"{BEGIN}\n{BEGIN}\n{END}"])
def test_missing_or_misplaced_markers_are_an_error(doc: str) -> None:
    with pytest.raises(ValueError, match="faults:begin"):
        replace_block(doc, "x")


def test_a_scenario_that_lost_writes_shows_as_failed_with_its_count_in_bold() -> None:
    md = render([record("clean kill", faults_md=1),
                 record("lossy kill", faults_md=2, lost=3, problems=3, passed=False)], RUN)
    assert row_of(md, "clean kill")["Result"] == "held"
    assert row_of(md, "clean kill")["Lost"] == "0"
    lossy = row_of(md, "lossy kill")
    assert lossy["Lost"] == "**3**" and lossy["Result"] == "**FAILED** (3 problems)"
    assert "2 scenarios, 1 held, 1 failed" in md
    assert RUN.commit in md and RUN.machine in md and RUN.date in md


def test_a_failed_test_with_clean_figures_is_still_failed() -> None:
    md = render([record("slow exit", passed=False)], RUN)
    assert row_of(md, "slow exit")["Result"] == "**FAILED**"


def test_figures_a_scenario_does_not_check_show_as_a_dash() -> None:
    md = render([record("failover", faults_md=None, regressed=None, unknown=None,
                        recovery_s=None)], RUN)
    row = row_of(md, "failover")
    assert (row["FAULTS.md"], row["Regressed"], row["Unknown"], row["Recovery (s)"]) == (
        "–", "–", "–", "–")


def test_rows_follow_the_faults_md_numbers_and_notes_say_what_recovery_measures() -> None:
    md = render([record("nemesis", faults_md=28), record("unnumbered", faults_md=None),
                 record("sigterm", faults_md=6, notes="exited in 1.2 s")], RUN)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[1] for r in rows[1:]] == ["sigterm", "nemesis", "unnumbered"]
    assert "- sigterm (`tests/faults/test_x.py::test_sigterm`): restart -> drained. exited " \
           "in 1.2 s." in md


def test_pipes_in_text_do_not_break_the_table() -> None:
    md = render([record("a | b")], RUN)
    assert row_of(md, "a \\| b")["Scenario"] == "a \\| b"


def test_the_records_file_is_read_as_written_the_last_record_of_a_test_winning(
        tmp_path: Path) -> None:
    path = tmp_path / "faults.jsonl"
    first, again = Outcome("t::a"), Outcome("t::a", acknowledged=7)
    for outcome in (first, Outcome("t::b"), again):
        write(path, outcome)
    assert [(r["test"], r["acknowledged"]) for r in load(path)] == [("t::b", 0), ("t::a", 7)]


def test_a_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "faults.jsonl"
    path.write_bytes(orjson.dumps(dataclasses.asdict(Outcome("t::a"))) + b"\n{oops\n")
    with pytest.raises(ValueError, match=r"faults\.jsonl:2"):
        load(path)


def test_no_records_is_an_error_that_says_how_to_make_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text(f"{BEGIN}\nold\n{END}\n")
    assert report.main([str(tmp_path / "none.jsonl"), str(doc)]) == 1
    assert "TIERPROXY_FAULTS_RESULTS=" in capsys.readouterr().err
    assert doc.read_text() == f"{BEGIN}\nold\n{END}\n"


# ---- the recording fixture's body (results.recording)


def fake_request(failed: int = 0) -> Any:
    """What recording() reads of a pytest request: the node id, the session's failures."""
    return SimpleNamespace(node=SimpleNamespace(nodeid="t::x"),
                           session=SimpleNamespace(testsfailed=failed))


def run_test(request: Any, *, name: bool = True, fails: bool = False) -> None:
    """The fixture's life: set up, the test (naming its scenario, maybe failing), teardown."""
    gen = recording(request)
    outcome = next(gen)
    if name:
        outcome.describe("kill", faults_md=1, recovery="kill -> drained")
    if fails:
        request.session.testsfailed += 1
    with pytest.raises(StopIteration):
        next(gen)


def test_nothing_is_recorded_unless_the_variable_names_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    run_test(fake_request())
    assert list(tmp_path.iterdir()) == []


def test_a_named_scenario_is_recorded_with_whether_its_test_passed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out" / "faults.jsonl"
    monkeypatch.setenv(ENV, str(path))
    run_test(fake_request(failed=2))
    run_test(fake_request(failed=2), fails=True)
    run_test(fake_request(), name=False)  # skipped before naming its scenario
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [(r["scenario"], r["passed"]) for r in records] == [("kill", True), ("kill", False)]
    assert records[0]["finished"].endswith("+00:00")
