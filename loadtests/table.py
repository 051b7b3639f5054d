"""The bench's results table: one Markdown table of every headline figure of the run, each
with its baseline from the same run, their ratio, the product's target and whether it is met.

A scenario names its rows with `Line`s (figure keys into its medians); the targets are its
`Check`s, matched to a row by the figure they test (the row's ratio or its value).
"""

from __future__ import annotations

import math
import operator
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Figures = dict[str, float]


@dataclass(frozen=True)
class Check:
    """A product target on one figure, e.g. Check("ratio", ">=", 0.5, "...")."""

    figure: str
    op: str  # ">=" or "<="
    limit: float
    label: str

    def passes(self, figures: Figures) -> bool:
        compare = operator.ge if self.op == ">=" else operator.le
        value = figures.get(self.figure)
        return value is not None and not math.isnan(value) and bool(compare(value, self.limit))


@dataclass(frozen=True)
class Line:
    """One row: `value` (a figure key) in `unit`; optionally a baseline figure and what it is,
    and a ratio figure: `×` for a ratio, or a unit for a difference (value - baseline)."""

    figure: str
    value: str
    unit: str = ""
    baseline: str = ""
    baseline_name: str = ""
    ratio: str = ""
    ratio_unit: str = "×"


def number(value: float | None, unit: str = "") -> str:
    """A figure for people: thousands separated, decimals where they matter."""
    if value is None or math.isnan(value):
        return "n/a"
    size = abs(value)
    if unit in ("req/s", "rows/s") or size >= 100:
        text = f"{value:,.0f}"
    elif size >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip() if unit not in ("×", "") else text + unit


def _signed(value: float | None, unit: str) -> str:
    text = number(value, unit)
    return text if value is None or math.isnan(value) or value < 0 else f"+{text}"


def _target(check: Check | None, line: Line) -> str:
    if check is None:
        return ""
    op = "≥" if check.op == ">=" else "≤"
    if check.figure == line.ratio and line.ratio_unit == "×":
        return f"{op} {check.limit:g}×"
    if check.figure == line.ratio:
        return f"{op} {'+' if check.limit >= 0 else ''}{check.limit:g} {line.ratio_unit}"
    return f"{op} {check.limit:g} {line.unit}".rstrip()


def row(scenario: str, line: Line, figures: Figures, checks: Sequence[Check]) -> list[str]:
    check = next((c for c in checks if c.figure in (line.ratio, line.value) and c.figure), None)
    baseline = ""
    if line.baseline:
        baseline = f"{line.baseline_name} {number(figures.get(line.baseline), line.unit)}"
    ratio = ""
    if line.ratio:
        value = figures.get(line.ratio)
        ratio = (number(value, "×") if line.ratio_unit == "×"
                 else _signed(value, line.ratio_unit))
    verdict = "" if check is None else ("PASS" if check.passes(figures) else "**FAIL**")
    return [scenario, line.figure, number(figures.get(line.value), line.unit), baseline, ratio,
            _target(check, line), verdict]


def markdown(rows: Sequence[Sequence[str]]) -> str:
    head = ["scenario", "figure", "value", "baseline (same run)", "ratio", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines()
             if ln.startswith("model name")]
    return names[0] if names else "unknown CPU"


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return math.nan


def machine() -> dict[str, Any]:
    return {"cpu_model": _cpu_model(), "cpus": os.cpu_count(),
            "memory_gb": round(_memory_gb(), 1), "kernel": platform.release(),
            "os": platform.platform(terse=True), "load_average_1m": os.getloadavg()[0]}


def describe(meta: dict[str, Any]) -> str:
    """The header of results.md: when, what code, which machine, which options."""
    m, o = meta["machine"], meta["options"]
    return "\n".join([
        f"tierproxy bench, {meta['started_at']}, git {meta['git']}, {meta['seconds']:.0f} s",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory_gb']:g} GB, {m['os']}; "
        f"Python {meta['python']}, aiohttp {meta['aiohttp']}; load average "
        f"{m['load_average_1m']:.2f} at the start, {meta['load_average_end']:.2f} at the end; "
        f"processes outside the bench used up to {meta['others_max_pct']:.0f}% of a core "
        "during a measurement.",
        f"Options: {o['repetitions']} repetition(s) (medians) x {o['duration_s']:g} s "
        f"(+{o['warmup_s']:g} s warm-up), {o['concurrency']} connections, "
        f"--rate {o['rate']:g}/s.",
    ])
