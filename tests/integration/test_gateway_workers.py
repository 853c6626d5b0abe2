"""`orchestrator gateway` with several worker processes on one port (issue 11): real Tansu, real
tritonserver, the real service, the gateway as a real child process (the supervisor) and its
workers as its children."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from orchestrator.adapters.child_process import listening_pids, process_tree
from orchestrator.adapters.kafka_broker import create_topics
from tests.integration.service_harness import make_settings, running_service
from tests.integration.test_gateway import Gateway, _keys_file, auth, read_events

pytestmark = pytest.mark.integration

WORKERS = 2


async def workers_listening(gw: Gateway, timeout: float = 90.0) -> set[int]:
    """The worker pids once `WORKERS` children of the supervisor listen on its port."""
    assert gw.process is not None
    deadline = time.monotonic() + timeout
    while True:
        code = gw.process.poll()
        assert code is None, f"gateway exited with {code}:\n{gw.output()}"
        children = process_tree(gw.process.pid) - {gw.process.pid}
        listening = listening_pids(gw.port)
        if len(children) == WORKERS and listening == children:
            return children
        assert time.monotonic() < deadline, f"workers not listening:\n{gw.output()}"
        await asyncio.sleep(0.1)


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids still running (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture
async def workers_gateway(
    kafka: Any, triton: Any, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, set[int]]]:
    settings = make_settings(kafka, triton, output_dir=tmp_path / "images")
    registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
    await create_topics(settings.bootstrap_servers, [registry], partitions=2)
    async with running_service(settings):
        gw = Gateway(tmp_path, settings, registry, _keys_file(tmp_path / "keys.json"))
        gw.env["ORCHESTRATOR_GATEWAY_WORKERS"] = str(WORKERS)
        pids: set[int] = set()
        try:
            gw.start()
            pids = await workers_listening(gw)
            yield gw, pids
        finally:
            gw.stop()
            assert not wait_gone(pids), f"workers left running:\n{gw.output()}"


async def test_workers_share_the_port_and_drain_on_sigterm(
    workers_gateway: tuple[Gateway, set[int]],
) -> None:
    gw, pids = workers_gateway
    assert gw.process is not None
    replicas: set[str] = set()
    jobs: list[str] = []
    # a fresh connection per request: the kernel picks a worker per connection
    for i in range(40):
        async with aiohttp.ClientSession() as http:
            if i < 4:
                body = {"prompt": f"a kite {i}", "steps": 2, "seed": i}
                async with http.post(f"{gw.url}/v1/jobs", json=body, headers=auth("alice")) as r:
                    assert r.status == 202, await r.text()
                    jobs.append((await r.json())["id"])
                    replicas.add(r.headers["X-Gateway-Replica"])
            else:
                async with http.get(f"{gw.url}/healthz") as r:
                    assert r.status == 200
                    replicas.add(r.headers["X-Gateway-Replica"])
        if i >= 4 and len(replicas) == WORKERS:
            break
    assert len(replicas) == WORKERS, replicas
    # every job is followed to its end on whichever worker a new connection reaches
    timeout = aiohttp.ClientTimeout(total=120)
    for job_id in jobs:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            url = f"{gw.url}/v1/jobs/{job_id}/events"
            events = await read_events(http, url, auth("alice"))
        assert events[-1][1] == "outcome" and events[-1][2]["status"] == "succeeded", events
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gw.url}/v1/jobs/{job_id}", headers=auth("alice")) as r,
        ):
            assert r.status == 200
            assert (await r.json())["status"] == "succeeded"
    # SIGTERM to the supervisor: every worker drains and ends, the supervisor exits 0
    gw.process.send_signal(signal.SIGTERM)
    assert gw.process.wait(30) == 0, gw.output()
    assert not wait_gone(pids), gw.output()
    assert gw.output().count("Shutting down") == WORKERS, gw.output()


async def test_a_killed_worker_stops_the_gateway(
    workers_gateway: tuple[Gateway, set[int]],
) -> None:
    gw, pids = workers_gateway
    assert gw.process is not None
    victim, other = sorted(pids)
    os.kill(victim, signal.SIGKILL)
    assert gw.process.wait(30) == 1, gw.output()
    assert f"worker pid {victim} was killed by SIGKILL" in gw.output()
    assert not wait_gone({victim, other}), gw.output()
    assert not listening_pids(gw.port)


def test_workers_on_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """No Kafka needed: the supervisor checks the port before it starts a worker."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        command = [sys.executable, "-m", "orchestrator", "gateway", "--workers", "2"]
        done = subprocess.run(
            [*command, "--port", str(port)], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stderr
    assert f"error: gateway port {port} on 127.0.0.1 is held by pid {os.getpid()}" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_out_of_range_is_a_settings_error() -> None:
    command = [sys.executable, "-m", "orchestrator", "gateway", "--workers", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "workers" in done.stderr, done.stderr
