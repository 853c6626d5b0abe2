"""`orchestrator dev` as a user runs it: killed hard it leaves nothing behind and starts again
on the same ports; a port someone else holds is named with its holder and the flag to change.

Each `dev` is a real subprocess (real Tansu, real tritonserver, the real service) on free ports,
serving the session's tiny models.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator.adapters.child_process import (
    PortClaim,
    check_ports,
    free_port,
    spawn,
    stop_process_group,
)
from orchestrator.adapters.kafka_broker import BrokerStartError, TansuBroker
from orchestrator.adapters.triton_server import (
    TritonServer,
    TritonServerError,
    remove_shm_regions,
)

pytestmark = pytest.mark.integration

FLAGS = (
    "--kafka-port",
    "--grpc-port",
    "--http-port",
    "--metrics-port",
    "--service-http-port",
    "--gateway-port",
)
READY_TIMEOUT_S = 180.0


def dev_env() -> dict[str, str]:
    """This environment without ORCHESTRATOR_* settings: `dev` runs on its defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


class Dev:
    """One `python -m orchestrator dev` subprocess; its output collected line by line."""

    def __init__(self, models_dir: Path, work_dir: Path, ports: dict[str, int]) -> None:
        command = [sys.executable, "-m", "orchestrator", "--log-level", "WARNING", "dev"]
        command += ["--models-dir", str(models_dir), "--work-dir", str(work_dir)]
        for flag in FLAGS:
            command += [flag, str(ports[flag])]
        # spawn: this `dev` dies with the test process, whatever happens to the test
        self.process = spawn(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dev_env()
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if line.startswith("ready"):
                self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            code = self.process.poll()
            if code is not None:
                self._reader.join(5)
                pytest.fail(f"`dev` exited with {code} before `ready`:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"`dev` not ready after {timeout:.0f} s:\n{self.output}")

    def finish(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def close(self) -> None:
        if self.process.returncode is None:
            stop_process_group(self.process, timeout=30, sig=signal.SIGINT)


@pytest.fixture
def devs() -> Iterator[list[Dev]]:
    started: list[Dev] = []
    yield started
    for dev in started:
        dev.close()


def distinct_free_ports() -> dict[str, int]:
    return {flag: free_port() for flag in FLAGS}  # free_port never repeats a recent port


def claims(ports: dict[str, int]) -> list[PortClaim]:
    return [PortClaim(port, flag, flag, "0.0.0.0") for flag, port in ports.items()]


def living(processes: list[psutil.Process]) -> list[str]:
    """The processes still running (a zombie has released everything: it counts as dead)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {process.name()}")
        except psutil.NoSuchProcess:
            continue
    return alive


def wait_all_gone(processes: list[psutil.Process], ports: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = living(processes)
        try:
            check_ports(claims(ports))
            taken = ""
        except RuntimeError as exc:
            taken = str(exc)
        if not alive and not taken:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:.0f} s still alive: {alive}; ports: {taken or 'free'}")
        time.sleep(0.1)


def triton_shm_prefixes(processes: list[psutil.Process]) -> list[str]:
    """The /dev/shm region prefixes of the tritonservers among `processes` (read while they
    run: a dead process has no command line)."""
    prefixes = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.name() == "tritonserver":
                for arg in process.cmdline():
                    _, found, prefix = arg.partition("shm-region-prefix-name=")
                    if found and prefix:
                        prefixes.append(prefix)
    return prefixes


async def one_request(bootstrap_servers: str) -> None:
    from orchestrator.client import Client
    from orchestrator.config import Settings
    from orchestrator.domain import GenerationRequest
    from orchestrator.service import kafka_settings

    settings = Settings(bootstrap_servers=bootstrap_servers)
    async with Client(
        kafka_settings(settings),
        request_topic=settings.request_topic,
        response_topic=settings.response_topic,
        dlq_topic=settings.dlq_topic,
    ) as client:
        answer = await client.generate(GenerationRequest(prompt="a red cube", steps=2), 120)
    assert answer.ok, answer.reason
    assert answer.result is not None and len(answer.result.images) == 1


@pytest.mark.faults
def test_sigkilled_dev_leaves_nothing_and_restarts_on_the_same_ports(
    tiny_models: Path, tmp_path: Path, devs: list[Dev]
) -> None:
    ports = distinct_free_ports()
    first = Dev(tiny_models, tmp_path / "dev", ports)
    devs.append(first)
    first.wait_ready()
    tree = first.descendants()
    names = [p.name() for p in tree]
    assert any(n.startswith("tansu") for n in names), names
    assert "tritonserver" in names, names
    assert "triton_python_backend_stub" in names, names  # the grandchildren are watched too
    killed_shm = triton_shm_prefixes(tree)
    assert len(killed_shm) == 1, killed_shm

    os.kill(first.process.pid, signal.SIGKILL)
    assert first.finish(10) == -signal.SIGKILL
    wait_all_gone(tree, ports, timeout=10)
    for prefix in killed_shm:
        remove_shm_regions(prefix)

    second = Dev(tiny_models, tmp_path / "dev", ports)
    devs.append(second)
    second.wait_ready()
    assert f"kafka 127.0.0.1:{ports['--kafka-port']}" in second.output
    tree = second.descendants()
    asyncio.run(one_request(f"127.0.0.1:{ports['--kafka-port']}"))

    second.process.send_signal(signal.SIGTERM)  # the ordinary exit path leaves nothing either
    assert second.finish(60) == 0, second.output
    assert second.lines[-1] == "stopped", second.output
    wait_all_gone(tree, ports, timeout=10)


TRITON_PARENT = textwrap.dedent(
    """
    import sys, time
    from orchestrator.adapters.triton_server import TritonServer

    TritonServer(sys.argv[1], work_dir=sys.argv[2]).start()
    time.sleep(300)
    """
)


@pytest.mark.faults
def test_parent_killed_while_triton_loads_leaves_no_stub(tiny_models: Path, tmp_path: Path) -> None:
    """A stub still initializing when tritonserver dies does not notice (it waits on shared
    memory forever, seen here): the launcher's group guard kills it."""
    parent = spawn(
        [sys.executable, "-c", TRITON_PARENT, str(tiny_models / "repository"), str(tmp_path)]
    )
    seen: dict[int, psutil.Process] = {}
    stubs: set[int] = set()
    killed_shm: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while len(stubs) < 8:
            assert parent.poll() is None, "the parent died"
            assert time.monotonic() < deadline, f"stubs did not start: {seen}"
            for child in psutil.Process(parent.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    seen[child.pid] = child
                    if child.name() == "triton_python_backend_stub":
                        stubs.add(child.pid)
            time.sleep(0.05)
        killed_shm = triton_shm_prefixes(list(seen.values()))
        assert len(killed_shm) == 1, killed_shm
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_all_gone(list(seen.values()), {}, timeout=5)
    finally:
        stop_process_group(parent, timeout=1)
        for process in seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        for prefix in killed_shm:
            remove_shm_regions(prefix)


HOLDER = textwrap.dedent(
    """
    import socket, sys, time
    sockets = []
    for port in sys.argv[1:]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", int(port)))
        sock.listen()
        sockets.append(sock)
    print("listening", flush=True)
    time.sleep(300)
    """
)


def test_dev_refuses_ports_held_by_another_process_naming_holder_and_flag(
    tmp_path: Path, devs: list[Dev]
) -> None:
    ports = distinct_free_ports()
    holder = spawn(
        [sys.executable, "-c", HOLDER, *map(str, ports.values())], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"listening"
        # models are never built: the ports are checked before anything starts
        dev = Dev(tmp_path / "no-models", tmp_path / "dev", ports)
        devs.append(dev)
        code = dev.finish(120)
    finally:
        stop_process_group(holder, timeout=1)
    assert code != 0, dev.output
    assert "ready" not in dev.output
    for flag, port in ports.items():
        named = [line for line in dev.lines if f"port {port} " in line]
        assert named, f"{flag} port {port} not named:\n{dev.output}"
        assert f"held by pid {holder.pid} " in named[0] and flag in named[0], named[0]
    assert "-c" in dev.output  # the holder's command line
    assert not (tmp_path / "no-models").exists(), "models were built before the port check"
    assert not (tmp_path / "dev" / "tansu.log").exists(), "tansu was started"


def test_launchers_refuse_a_held_port_naming_its_holder(tmp_path: Path) -> None:
    (tmp_path / "repository").mkdir()
    with TansuBroker(0) as broker:
        assert broker.pid is not None
        with pytest.raises(BrokerStartError, match=rf"held by pid {broker.pid} \(.*tansu"):
            TansuBroker(broker.port).start()
        triton = TritonServer(
            tmp_path / "repository", work_dir=tmp_path / "triton", grpc_port=broker.port
        )
        with pytest.raises(TritonServerError, match=rf"gRPC port {broker.port} is held by pid"):
            triton.start()
        assert triton.pid is None
