"""Each module imports alone (no cycles, no warnings at import), and imports point one way:
leaves import only leaves, nothing imports the API layer, the backends never reach the log or
the hot tier, drivers and frameworks stay behind their fences, and no file in proxy/ is longer
than 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"
MODULES = sorted(
    ".".join(p.relative_to(PROXY.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PROXY.rglob("*.py") if p.name != "__main__.py")
LEAVES = {"proxy.settings", "proxy.model", "proxy.errors", "proxy.keys", "proxy.metrics",
          "proxy.backoff"}
# The API layer: routes and their middlewares, the composition of a process (app, services),
# the worker's socket (internal), the supervisor and the command line.
API = {"proxy.routes", "proxy.routes_feeds", "proxy.middlewares", "proxy.app",
       "proxy.services", "proxy.internal", "proxy.supervisor", "proxy.main"}
MAX_LINES = 400
# Which modules may import a driver or framework (STYLE.md: drivers are fenced). A name ending
# in ".*" allows a whole package; a plain name must really import it (no stale allowances).
FENCES = {
    "asyncpg": {"proxy.backends.postgres", "proxy.backends.postgres.*"},
    "clickhouse_connect": {"proxy.backends.clickhouse"},
    "chdb": set(),  # reached only through clickhouse-connect's chdb:// DSN
    "uvloop": {"proxy.main"},
    # The modules that talk to Redis: the connection and scripts, the log, pub/sub fan-out and
    # the topology's clients (others name the client type as redisconn.RedisClient).
    "redis": {"proxy.redisconn", "proxy.autopipe", "proxy.writelog", "proxy.hub",
              "proxy.topology"},
    # HTTP and WebSocket: the server side and the typed client package.
    "aiohttp": {"proxy.routes", "proxy.routes_feeds", "proxy.middlewares", "proxy.app",
                "proxy.services",
                "proxy.internal",
                "proxy.supervisor", "proxy.main", "proxy.hub", "proxy.wsconn",
                "proxy.wsframes", "proxy.tracing", "proxy.client.*"},
    "opentelemetry": {"proxy.tracing"},  # optional (the otel extra), imported lazily
}
# What the backends must never reach, directly or through another module: the log and the
# hot tier (the flusher hands them changes; the hot tier calls them, never the reverse).
BELOW_BACKENDS = ("proxy.writelog", "proxy.hot")


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


def ours(module: str) -> set[str]:
    return {m for m in imports_of(module) if m in MODULES}


def reachable(module: str) -> set[str]:
    """Every module of ours that importing `module` imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for m in ours(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def uses(module: str, package: str) -> bool:
    return any(i == package or i.startswith(package + ".") for i in imports_of(module))


def allowed(module: str, fence: set[str]) -> bool:
    return module in fence or any(
        f.endswith(".*") and module.startswith(f[:-1]) for f in fence)


def test_discovery_covers_every_module_of_every_subpackage() -> None:
    files = [p for p in PROXY.rglob("*.py") if p.name != "__main__.py"]
    assert len(MODULES) == len(files) == len(set(MODULES))
    packages = {".".join(p.parent.relative_to(PROXY.parent).parts)
                for p in PROXY.rglob("__init__.py")}
    assert {"proxy.backends", "proxy.hot", "proxy.embedded", "proxy.openapi",
            "proxy.client"} <= packages <= set(MODULES)
    assert {"proxy.backends.postgres", "proxy.hot.core", "proxy.openapi.paths"} <= set(MODULES)


def test_no_relative_imports() -> None:
    """Relative imports would slip past imports_of, and so past every fence here."""
    relative = [f"{p.relative_to(PROXY.parent)}:{node.lineno}" for p in PROXY.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, subprocess.CompletedProcess[str]]:
    """Each module imported in a fresh interpreter with warnings as errors, a few at a time
    (one after the other, this file would take most of a minute)."""
    def run(module: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"],
                              capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the machines have 2 cores
        return dict(zip(MODULES, pool.map(run, MODULES), strict=True))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str,
                              imported_alone: dict[str, subprocess.CompletedProcess[str]],
                              ) -> None:
    done = imported_alone[module]
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_one_way(module: str) -> None:
    found = ours(module)
    if module in LEAVES:
        assert found <= LEAVES, f"leaf {module} imports {found - LEAVES}"
    if module not in API:
        assert not found & API, f"{module} imports the API layer: {found & API}"
    if module == "proxy.routes":
        assert not found & {"proxy.app", "proxy.services", "proxy.main"}


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("proxy.backends")])
def test_backends_never_reach_the_log_or_the_hot_tier(module: str) -> None:
    below = {m for m in reachable(module) if m.startswith(BELOW_BACKENDS)}
    assert not below, f"{module} imports {sorted(below)} (directly or through another module)"


@pytest.mark.parametrize("driver", sorted(FENCES))
def test_drivers_stay_behind_their_fence(driver: str) -> None:
    users = {m for m in MODULES if uses(m, driver)}
    outside = {m for m in users if not allowed(m, FENCES[driver])}
    assert not outside, f"{driver} imported by {sorted(outside)}, outside its fence"


@pytest.mark.parametrize("driver", sorted(FENCES))
def test_fences_are_tight(driver: str) -> None:
    """A module named in a fence exists and still imports the driver: when one stops, the
    fence shrinks with it."""
    named = {m for m in FENCES[driver] if not m.endswith(".*")}
    assert named <= set(MODULES), f"{driver} fence names unknown {sorted(named - set(MODULES))}"
    stale = {m for m in named if not uses(m, driver)}
    assert not stale, f"{sorted(stale)} no longer import {driver}: remove them from its fence"


def test_no_redis_or_sql_in_routes() -> None:
    text = (PROXY / "routes.py").read_text()
    assert "import redis" not in text and "from redis" not in text
    assert "SELECT " not in text and "INSERT " not in text


def test_files_stay_under_400_lines() -> None:
    files = [p for p in PROXY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".lua" for p in files)  # scripts count too
    sizes = {str(p.relative_to(PROXY.parent)): len(p.read_bytes().splitlines()) for p in files}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"files over {MAX_LINES} lines (split them by concern): {over}"
