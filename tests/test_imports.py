"""Each module imports alone (no cycles, no warnings at import), and imports point one way:
leaves import only leaves, nothing imports the API layer, drivers stay behind their fences."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"
MODULES = sorted(
    ".".join(p.relative_to(PROXY.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PROXY.rglob("*.py") if p.name != "__main__.py")
LEAVES = {"proxy.settings", "proxy.model", "proxy.errors", "proxy.keys", "proxy.metrics",
          "proxy.backoff"}
API = {"proxy.routes", "proxy.app", "proxy.main"}
# Which modules may import a driver (STYLE.md: drivers are fenced).
FENCES = {
    "asyncpg": {"proxy.backends.postgres"},
    "clickhouse_connect": {"proxy.backends.clickhouse"},
    "chdb": {"proxy.backends.clickhouse"},
    "uvloop": {"proxy.main"},
}


def imports_of(module: str) -> set[str]:
    path = PROXY.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PROXY.parent / module.replace(".", "/") / "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    done = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_one_way(module: str) -> None:
    ours = {m for m in imports_of(module) if m in MODULES}
    if module in LEAVES:
        assert ours <= LEAVES, f"leaf {module} imports {ours - LEAVES}"
    if module not in API:
        assert not ours & API, f"{module} imports the API layer: {ours & API}"
    if module == "proxy.routes":
        assert "proxy.app" not in ours


@pytest.mark.parametrize("driver", sorted(FENCES))
def test_drivers_stay_behind_their_fence(driver: str) -> None:
    users = {m for m in MODULES
             if any(i == driver or i.startswith(driver + ".") for i in imports_of(m))}
    assert users <= FENCES[driver], f"{driver} imported by {users - FENCES[driver]}"


def test_no_redis_or_sql_in_routes() -> None:
    text = (PROXY / "routes.py").read_text()
    assert "import redis" not in text and "from redis" not in text
    assert "SELECT " not in text and "INSERT " not in text
