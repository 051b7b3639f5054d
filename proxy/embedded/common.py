"""What the embedded servers share: ports that survive restarts, locating binaries in their
wheels, children that die with the sidecar, log tails for error messages."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import random
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
PORT_FILE = "port"  # the chosen port, so a restart keeps the URLs clients were given
PORTS_FROM = 20000  # free_port's range starts here (below: well-known and common dev ports)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, below the kernel's ephemeral
    range where it can: a port from that range (what bind(0) gives) can be taken as the source
    port of any outgoing connection while its server restarts, and the restart then fails
    with "address already in use" (the nemesis met it)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(PORTS_FROM, low) if low > PORTS_FROM else 0
        if port and port_is_free(port):
            return port
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; IANA's 49152 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # Same option the servers set, so a port in TIME_WAIT after a kill counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def remembered_port(port_file: Path) -> int:
    """The port a previous run stored, if still free; otherwise a new free one."""
    try:
        port = int(port_file.read_text())
    except (OSError, ValueError):
        return free_port()
    return port if port_is_free(port) else free_port()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"embedded mode needs {name!r}: pip install 'tierproxy[embedded]'")
    return Path(next(iter(spec.submodule_search_locations)))


def die_with_parent(parent_pid: int,
                    sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that signals the child when we die, so a kill -9'd sidecar leaves nothing
    running: servers get SIGTERM (Redis then syncs its AOF), a supervisor's own processes
    SIGKILL (as if the whole pod was killed: no final flush, peers reclaim what they held).

    Linux ties this to the forking *thread*: start servers from a thread that lives as long as
    the process (the main thread), or they are stopped when that thread exits.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return arm


