"""Children that die with their parent, and ports named with their holders (no servers)."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator.adapters import child_process
from orchestrator.adapters.child_process import (
    GroupGuard,
    PortClaim,
    PortsUnavailable,
    check_ports,
    foreign_listeners,
    free_port,
    port_problem,
    spawn,
    stop_process_group,
)

# A parent that spawns `sleep` through spawn() (from its main thread, or from a thread that has
# ended by the time it prints the child's pid) and then waits to be killed.
PARENT = textwrap.dedent(
    """
    import sys, threading, time
    from orchestrator.adapters.child_process import spawn

    children = []
    if sys.argv[1] == "main":
        children.append(spawn(["sleep", "300"]))
    else:
        worker = threading.Thread(target=lambda: children.append(spawn(["sleep", "300"])))
        worker.start()
        worker.join()
    time.sleep(0.3)  # a parent-death signal tied to the ended thread would have fired by now
    print(children[0].pid, flush=True)
    time.sleep(300)
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_child_dies_when_its_parent_is_killed(thread: str) -> None:
    parent = spawn([sys.executable, "-c", PARENT, thread], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip(), "the parent printed no child pid"
        child = int(line)
        assert alive(child), "the child died before its parent (signal tied to an ended thread)"
        assert os.getpgid(child) == child, "the child is not in a process group of its own"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_dead(child), f"child {child} outlived its SIGKILLed parent"
    finally:
        stop_process_group(parent, timeout=1)


# A parent whose other threads keep running Python while it spawns `sleep` from its main thread
# and from several threads at once; an at-fork handler leaves a mark if Python runs in a forked
# child (what a preexec_fn does, and what crashed children in OpenTelemetry's handler).
BUSY_PARENT = textwrap.dedent(
    """
    import os, sys, threading
    from orchestrator.adapters.child_process import spawn

    mark = sys.argv[1]
    os.register_at_fork(after_in_child=lambda: os.close(os.open(mark, os.O_CREAT | os.O_WRONLY)))
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(range(1000))

    for _ in range(4):
        threading.Thread(target=busy, daemon=True).start()
    children = []
    spawners = [
        threading.Thread(target=lambda: children.append(spawn(["sleep", "300"])))
        for _ in range(3)
    ]
    for thread in spawners:
        thread.start()
    children.append(spawn(["sleep", "300"]))
    for thread in spawners:
        thread.join()
    print(*(child.pid for child in children), flush=True)
    threading.Event().wait(300)
    """
)


def test_child_spawned_while_other_threads_run_dies_with_its_parent(tmp_path: Path) -> None:
    mark = tmp_path / "python-ran-in-a-forked-child"
    parent = spawn([sys.executable, "-c", BUSY_PARENT, str(mark)], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 4, "the parent did not spawn its four children"
        assert all(alive(child) for child in children)
        assert not mark.exists(), "Python code ran in a forked child before exec"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        survivors = [child for child in children if not wait_dead(child)]
        assert not survivors, f"children {survivors} outlived their SIGKILLed parent"
    finally:
        stop_process_group(parent, timeout=1)


def test_spawn_raises_like_popen_when_the_program_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        spawn(["no-such-program-here"])
    assert missing.value.filename == "no-such-program-here"
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        spawn([str(script)])
    with pytest.raises(FileNotFoundError):  # a relative path is looked up from cwd, as Popen does
        spawn(["./not-there"], cwd=tmp_path)


def test_spawned_program_gets_its_environment_and_signals_as_popen_gives_them() -> None:
    env = {"PATH": os.environ["PATH"], "ONLY_THIS": "a=b c"}  # no LANG: a C locale to coerce
    listed = spawn(["env"], env=env, stdout=subprocess.PIPE)
    out, _ = listed.communicate(timeout=10)
    assert sorted(out.decode().splitlines()) == ["ONLY_THIS=a=b c", f"PATH={env['PATH']}"]
    status = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]
    expected = subprocess.run(status, stdout=subprocess.PIPE, check=True).stdout
    spawned = spawn(status, stdout=subprocess.PIPE)
    assert spawned.communicate(timeout=10)[0] == expected
    assert spawned.returncode == 0


def test_stop_process_group_kills_what_the_child_started() -> None:
    shell = spawn(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE)
    assert shell.stdout is not None
    grandchild = int(shell.stdout.readline())
    assert alive(grandchild)
    code = stop_process_group(shell, timeout=2)
    assert code != 0
    assert shell.returncode is not None
    assert wait_dead(grandchild, 2.0), "the child's own child survived stop_process_group"


# A parent whose child starts a helper of its own (`sleep`, in the child's process group), then
# waits to be killed; with "guard" a GroupGuard watches the child's group.
GUARDED = textwrap.dedent(
    """
    import sys, time
    from orchestrator.adapters.child_process import GroupGuard, spawn

    child = spawn(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=-1)
    guard = GroupGuard(child.pid) if sys.argv[1] == "guard" else None
    print(child.stdout.readline().decode().strip(), flush=True)
    time.sleep(300)
    """
)


@pytest.mark.parametrize("guarded", [True, False])
def test_group_guard_kills_the_childs_helpers_when_the_parent_dies(guarded: bool) -> None:
    parent = spawn(
        [sys.executable, "-c", GUARDED, "guard" if guarded else "none"], stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        helper = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        if guarded:
            assert wait_dead(helper), "the child's helper outlived the parent despite the guard"
        else:
            # what the guard is for: the parent-death signal reaches the child only
            assert not wait_dead(helper, 1.0)
            os.kill(helper, signal.SIGKILL)
    finally:
        stop_process_group(parent, timeout=1)


def test_released_group_guard_kills_nothing() -> None:
    child = spawn(["sleep", "300"])
    guard = GroupGuard(child.pid)
    guard_pid = guard.pid
    assert guard_pid is not None and alive(guard_pid)
    guard.release()
    assert not alive(guard_pid)
    time.sleep(0.2)
    assert child.poll() is None, "a released guard killed the group"
    stop_process_group(child, timeout=1)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_check_ports_names_holder_and_flag(listener: socket.socket) -> None:
    held = int(listener.getsockname()[1])
    free = free_port()
    with pytest.raises(PortsUnavailable) as info:
        check_ports(
            [
                PortClaim(held, "Kafka", "--kafka-port"),
                PortClaim(free, "Triton gRPC", "--grpc-port"),
                PortClaim(free, "Triton HTTP", "--http-port"),
                PortClaim(0, "picked later", "--unused"),
            ]
        )
    message = str(info.value)
    assert f"port {held} for Kafka is held by pid {os.getpid()}" in message
    assert "--kafka-port" in message
    assert sys.executable in message or "python" in message  # the holder's command line
    assert f"port {free} is given both to Triton gRPC (--grpc-port) and to Triton HTTP" in message
    assert "--unused" not in message
    check_ports([PortClaim(free, "Triton gRPC", "--grpc-port")])


def test_port_problem_on_the_wildcard_address(listener: socket.socket) -> None:
    held = int(listener.getsockname()[1])
    problem = port_problem("0.0.0.0", held)
    assert problem is not None and f"pid {os.getpid()}" in problem
    assert port_problem("0.0.0.0", free_port()) is None


def test_foreign_listeners_tells_ours_from_theirs(listener: socket.socket) -> None:
    held = int(listener.getsockname()[1])
    assert foreign_listeners(os.getpid(), held) is None
    stranger = spawn(["sleep", "30"])
    try:
        others = foreign_listeners(stranger.pid, held)
    finally:
        stop_process_group(stranger, timeout=1)
    assert others is not None and [h.pid for h in others] == [os.getpid()]
    assert foreign_listeners(os.getpid(), free_port()) == []


def test_spawn_refuses_to_be_told_how_to_start() -> None:
    with pytest.raises(TypeError):
        spawn(["true"], start_new_session=False)


def test_free_port_never_hands_out_a_recent_port_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may give two probes in a row the same ephemeral port (CI saw one tritonserver
    get the same number for its HTTP and metrics ports); free_port must not pass that on."""
    kernel_picks = iter([47001, 47001, 47001, 47002, 47001, 47003])

    class Probe:
        def __init__(self, *args: object) -> None:
            self.port = 0

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(kernel_picks)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", Probe)
    monkeypatch.setattr(child_process, "_handed_out", collections.deque(maxlen=4096))
    assert [free_port(), free_port(), free_port()] == [47001, 47002, 47003]
