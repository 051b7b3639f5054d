"""The Lua scripts by name, each with its `--#include lib/<file>.lua` lines expanded: Redis
runs one self-contained text per script, and a function two scripts need lives once."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
_INCLUDE = re.compile(r"^--#include (lib/[\w.]+\.lua)$", re.MULTILINE)


@cache
def scripts() -> dict[str, str]:
    """{name: text} of proxy/scripts/*.lua (lib/ holds only included parts)."""
    return {p.stem: _INCLUDE.sub(lambda m: (SCRIPTS / m[1]).read_text().rstrip("\n"),
                                 p.read_text())
            for p in sorted(SCRIPTS.glob("*.lua"))}
