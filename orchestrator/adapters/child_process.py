"""Server child processes that die with this one, and the ports they need.

Every launcher (Tansu, tritonserver, `orchestrator dev` under `make demo`) starts its child
through :func:`spawn`: the child gets its own session (one process group to signal, out of reach
of the terminal's Ctrl-C) and, on Linux, a parent-death signal, so that a SIGKILL of this process
or a closed terminal does not leave a broker or a Triton holding their ports.

The parent-death signal is armed with prctl(2) in the child, which must not run Python
between fork and exec: a forked child of a process whose other threads run (gRPC, OpenTelemetry,
the in-process service) can deadlock or crash there (seen: a segfault in OpenTelemetry's at-fork
handler run by a `preexec_fn`). :func:`spawn` therefore fork-execs a fresh interpreter (a plain
Popen, no Python after the fork) that arms the signal and then execs the program in the same
process, so the program keeps the pid, the session and the signal; this costs one Python start
(about 20-40 ms) per spawn, small beside the servers it starts.

Linux sends the parent-death signal when the *thread* that forked the child ends, not the
process. :func:`spawn` therefore forks from the main thread, or from one spawner thread that
lives as long as the process when called from any other thread.

A parent-death signal reaches only the child, not the helpers it started. tritonserver's
Python-backend stubs watch their parent, but one still initializing when the server dies waits on
its shared memory forever (seen here); a :class:`GroupGuard` kills the child's whole process
group when this process dies.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


_handed_out: collections.deque[int] = collections.deque(maxlen=4096)
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the child process binds it a moment later).

    The kernel may give the same ephemeral port to two probes in a row, since each probe closes
    its socket before anyone binds the port: one server then got the same number for its HTTP and
    metrics ports. So a port this process handed out lately is never handed out again.
    """
    with _handed_out_lock:
        for _ in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.append(port)
                return port
    raise OSError(errno.EADDRINUSE, f"no fresh free TCP port on {host} after 64 tries")


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


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds so far of these processes, together (those gone count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def foreign_listeners(pid: int, port: int) -> list[PortHolder] | None:
    """None if process `pid` (or one of its children) listens on `port` and nobody else does;
    otherwise the other listeners (an empty list: nobody listens yet)."""
    pids = listening_pids(port)
    ours = process_tree(pid)
    if pid in pids and pids <= ours:
        return None
    return [PortHolder(p, "?" if p is None else _command_line(p)) for p in pids - ours]


# -- spawning children that die with us -----------------------------------------------------------


#: Runs in a fresh interpreter that spawn() starts in place of the program (`python -I -S`, so
#: nothing of the user's Python set-up, about 20-40 ms): it arms the parent-death signal, makes
#: sure the parent did not die before that, restores the signals Python's start ignores (as
#: Popen does), takes the program's environment from the channel (the interpreter's own start
#: may have changed its environment, e.g. LC_CTYPE) and execs the program in the same process.
#: A failure is written back on the channel; a successful exec closes it.
_ARM_AND_EXEC = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
channel, parent, death = (int(word) for word in sys.argv[1:4])
try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if prctl(PR_SET_PDEATHSIG, death, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), death)
    data = bytearray()
    while chunk := os.read(channel, 1 << 16):
        data += chunk
    env = dict(item.split(b"=", 1) for item in bytes(data).split(b"\\0") if item)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    os.set_inheritable(channel, False)
    os.execvpe(sys.argv[4], sys.argv[5:], env)
except BaseException as exc:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
    os.write(channel, f"{getattr(exc, 'errno', 0) or 0} {reason}".encode())
    os._exit(127)
"""

#: how long spawn() waits for the program to be exec'd (a loaded machine starts Python slowly)
EXEC_TIMEOUT_S = 60.0


def _environment_block(env: Any) -> bytes:
    """`env` (None: this process's environment) as NUL-separated NAME=VALUE bytes."""
    items = os.environb.items() if env is None else env.items()
    block = bytearray()
    for name, value in items:
        name, value = os.fsencode(name), os.fsencode(value)
        if not name or b"=" in name or b"\0" in name or b"\0" in value:
            raise ValueError(f"illegal environment variable {name!r}")
        block += name + b"=" + value + b"\0"
    return bytes(block)


def _spawn_here(
    args: Sequence[str], death_signal: int, kwargs: dict[str, Any]
) -> subprocess.Popen[bytes]:
    """Fork-exec the wrapper (no Python runs between fork and exec), feed it the program's
    environment and wait until it has exec'd the program or reported why it could not."""
    if not sys.platform.startswith("linux"):  # no parent-death signal: a session of its own
        return subprocess.Popen(args, start_new_session=True, **kwargs)
    argv = [os.fsdecode(arg) for arg in ([args] if isinstance(args, (str, bytes)) else args)]
    program = os.fsdecode(kwargs.pop("executable", None) or argv[0])
    environment = _environment_block(kwargs.pop("env", None))
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            wrapper = [sys.executable, "-I", "-S", "-c", _ARM_AND_EXEC]
            wrapper += [str(theirs.fileno()), str(os.getpid()), str(death_signal), program, *argv]
            pass_fds = (*kwargs.pop("pass_fds", ()), theirs.fileno())
            process = subprocess.Popen(wrapper, start_new_session=True, pass_fds=pass_fds, **kwargs)
        try:
            ours.settimeout(EXEC_TIMEOUT_S)
            ours.sendall(environment)
            ours.shutdown(socket.SHUT_WR)
            report = b""
            while chunk := ours.recv(4096):
                report += chunk
        except OSError:
            stop_process_group(process, timeout=0)
            raise
    if report:
        process.wait()
        code, _, reason = report.decode("utf-8", "replace").partition(" ")
        if int(code):
            raise OSError(int(code), reason, program)
        raise OSError(f"cannot start {program}: {reason}")
    process.args = args  # what was asked for, as Popen would show it, not the wrapper
    return process


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
    process dies (Linux), whatever the thread that calls it. Like Popen it returns once the
    program runs, and raises OSError (FileNotFoundError, PermissionError...) if it cannot."""
    if "start_new_session" in kwargs or "preexec_fn" in kwargs:
        raise TypeError("spawn() starts its own session and runs no Python in the child")
    if kwargs.get("shell") or kwargs.get("restore_signals") is False:
        raise TypeError("spawn() runs a program, not a shell, and restores signals as Popen does")
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
