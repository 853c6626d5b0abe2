"""Server child processes that die with this one, and the ports they need.

Every launcher (Tansu, tritonserver, `orchestrator dev` under `make demo`) starts its child
through :func:`spawn`: the child gets its own session (one process group to signal, out of reach
of the terminal's Ctrl-C) and, on Linux, a parent-death signal, so that a SIGKILL of this process
or a closed terminal does not leave a broker or a Triton holding their ports.

Linux sends the parent-death signal when the *thread* that forked the child ends, not the
process. :func:`spawn` therefore forks from the main thread, or from one spawner thread that
lives as long as the process when called from any other thread.

A parent-death signal reaches only the child, not the helpers it started. tritonserver's
Python-backend stubs watch their parent, but one still initializing when the server dies waits on
its shared memory forever (seen here); a :class:`GroupGuard` kills the child's whole process
group when this process dies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

#: prctl(2) option that sets the signal a process gets when its parent (thread) dies
PR_SET_PDEATHSIG = 1

_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the child process binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- who holds a port ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PortHolder:
    """A process with a listening socket on a port; pid None when this user cannot see it."""

    pid: int | None
    command: str

    def describe(self) -> str:
        if self.pid is None:
            return "a process this user cannot inspect (try `sudo ss -ltnp`)"
        return f"pid {self.pid} ({self.command})"


def _command_line(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        words = process.cmdline() or [process.name()]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    text = " ".join(" ".join(words).split())  # one line, whatever the arguments hold
    return text if len(text) <= 300 else text[:297] + "..."


def listening_pids(port: int) -> set[int | None]:
    """Pids with a listening TCP socket on `port` (any address, IPv4 or IPv6); None for sockets
    whose owner this user cannot see."""
    pids: set[int | None] = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            pids.add(conn.pid)
    return pids


def port_holders(port: int) -> list[PortHolder]:
    """The processes listening on `port`, each once."""
    return [
        PortHolder(pid, "?" if pid is None else _command_line(pid))
        for pid in sorted(listening_pids(port), key=lambda p: -1 if p is None else p)
    ]


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now, naming the holder; None if it could."""
    holders = port_holders(port)
    if holders:
        return "is held by " + ", ".join(h.describe() for h in holders)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as servers bind: SO_REUSEADDR, so that connections in TIME_WAIT do not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is in use (bound by a socket that is not listening)"
            return f"cannot be bound: {exc.strerror or exc}"
    return None


@dataclass(frozen=True)
class PortClaim:
    """A port one server of a stack will listen on, and how the user changes it."""

    port: int
    what: str
    flag: str
    host: str = "127.0.0.1"


class PortsUnavailable(RuntimeError):
    """Ports a stack needs are taken (or given twice); the message names holders and flags."""


def check_ports(claims: Iterable[PortClaim]) -> None:
    """Raise PortsUnavailable naming every claimed port that is taken, its holder and the flag
    that changes it. Port 0 (pick a free one) is never checked."""
    problems: list[str] = []
    seen: dict[int, PortClaim] = {}
    for claim in claims:
        if claim.port == 0:
            continue
        if claim.port in seen:
            first = seen[claim.port]
            problems.append(
                f"port {claim.port} is given both to {first.what} ({first.flag}) and to "
                f"{claim.what} ({claim.flag})"
            )
            continue
        seen[claim.port] = claim
        problem = port_problem(claim.host, claim.port)
        if problem is not None:
            problems.append(
                f"port {claim.port} for {claim.what} {problem}; stop it or choose another "
                f"port with {claim.flag}"
            )
    if problems:
        raise PortsUnavailable("\n".join(problems))


# -- whether a server answering on a port is ours ----------------------------------------------


def process_tree(pid: int) -> set[int]:
    """`pid` and its descendants that are alive now (empty if `pid` is gone)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def foreign_listeners(pid: int, port: int) -> list[PortHolder] | None:
    """None if process `pid` (or one of its children) listens on `port` and nobody else does;
    otherwise the other listeners (an empty list: nobody listens yet)."""
    pids = listening_pids(port)
    ours = process_tree(pid)
    if pid in pids and pids <= ours:
        return None
    return [PortHolder(p, "?" if p is None else _command_line(p)) for p in pids - ours]


# -- spawning children that die with us -----------------------------------------------------------


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent(parent_pid: int, death_signal: int) -> Callable[[], None] | None:
    """The preexec_fn that arms the parent-death signal in the child, before exec."""
    prctl = _prctl()
    if prctl is None:
        return None

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent_pid:
            # the parent died between fork and prctl: the signal will never come
            os.kill(os.getpid(), death_signal)

    return arm


def _spawn_here(
    args: Sequence[str], death_signal: int, kwargs: dict[str, Any]
) -> subprocess.Popen[bytes]:
    preexec = _die_with_parent(os.getpid(), death_signal)
    return subprocess.Popen(args, start_new_session=True, preexec_fn=preexec, **kwargs)


def _spawner_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            # its one thread lives until the interpreter exits: children forked there keep
            # their parent-death signal armed for as long as this process runs
            _spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spawner")
        return _spawner


def spawn(
    args: Sequence[str], *, death_signal: int = signal.SIGKILL, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(args, **kwargs)` in a new session, killed by `death_signal` when this
    process dies (Linux), whatever the thread that calls it."""
    if "start_new_session" in kwargs or "preexec_fn" in kwargs:
        raise TypeError("spawn() sets start_new_session and preexec_fn itself")
    if threading.current_thread() is threading.main_thread():
        return _spawn_here(args, death_signal, kwargs)
    return _spawner_pool().submit(_spawn_here, args, death_signal, kwargs).result()


class GroupGuard:
    """A small Python process that SIGKILLs process group `pgid` when this process dies.

    It blocks reading a pipe whose only writer is this process: the kernel closes the pipe when
    this process ends, however it ends, and the read returns. :meth:`release` lets it go without
    killing anything; call it before the group's leader is reaped (its id could be reused).
    """

    SCRIPT = (
        "import os, sys\n"
        "if not sys.stdin.buffer.read(1):\n"
        "    try:\n"
        "        os.killpg(int(sys.argv[1]), 9)\n"
        "    except OSError:\n"
        "        pass\n"
    )

    def __init__(self, pgid: int) -> None:
        # a plain Popen: a parent-death signal would kill the guard before it could act
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-S", "-c", self.SCRIPT, str(pgid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def release(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.write(b"\n")
            process.stdin.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _exited_unreaped(pid: int) -> bool:
    """True once `pid` (our child) has exited; it stays a zombie, so its pid and process group
    id cannot be reused yet."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def stop_process_group(
    process: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM
) -> int:
    """Send `sig` to the child, give it `timeout` seconds, then SIGKILL its whole process group
    (helpers it started, e.g. Triton's Python-backend stubs) and reap it; returns its exit code.

    The group is killed while the child is still unreaped, so its id cannot belong to anyone else.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)  # not send_signal: it would reap an exited child
        deadline = time.monotonic() + timeout
        while not _exited_unreaped(process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait()
