"""Scale-out across Triton servers (issue 13): three real tritonservers behind one service.

On 2 cores this shows the mechanism (spread, failover, return, slow endpoint), not scaling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.triton_server import TritonServer
from orchestrator.domain import GenerationRequest
from orchestrator.service import Service
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def extra_tritons(
    tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[TritonServer]]:
    servers: list[TritonServer] = []
    try:
        for i in range(2):
            work = tmp_path_factory.mktemp(f"triton-extra-{i}")
            server = TritonServer(tiny_models / "repository", work_dir=work, startup_timeout=180)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def shares(service: Service) -> dict[str, int]:
    return {address: state.rows_sent for address, state in service.triton.endpoints.items()}


async def burst(client: Any, n: int, steps: int = 3, tag: str = "r") -> list[Any]:
    requests = [
        GenerationRequest(prompt=f"{tag} {i}", steps=steps, seed=i, guidance_scale=1.0)
        for i in range(n)
    ]
    return list(await asyncio.gather(*(client.generate(r, 240) for r in requests)))


async def test_load_spreads_and_a_killed_server_loses_no_request(
    kafka: Any, triton: Any, extra_tritons: list[TritonServer]
) -> None:
    servers = [triton, *extra_tritons]
    settings = make_settings(
        kafka,
        triton,
        triton_url=",".join(s.grpc_url for s in servers),
        batching="naive",
        max_in_flight=12,
        breaker_probe_interval_s=0.3,
    )
    async with running_service(settings) as service, client_for(settings) as client:
        answers = await burst(client, 24)
        spread = shares(service)
        print("rows per endpoint, all up:", spread)
        assert all(a.ok for a in answers)
        total = sum(spread.values())
        assert len(spread) == 3
        for address, rows in spread.items():
            assert rows >= total / 3 * 0.5, f"{address} got {rows} of {total} rows"

        # one server killed mid-run: its calls go elsewhere, nothing is lost
        victim = extra_tritons[0]
        start = shares(service)[victim.grpc_url]
        run = asyncio.create_task(burst(client, 48, steps=6, tag="k"))
        while shares(service)[victim.grpc_url] < start + 6:  # it is serving this burst
            assert not run.done()
            await asyncio.sleep(0.02)
        await asyncio.to_thread(victim.stop, 0.5)
        assert not run.done(), "the burst ended before the kill: make it longer"
        killed_at = shares(service)[victim.grpc_url]
        answers = await run
        stats = service.stats
        after_kill = shares(service)
        print("rows per endpoint, one killed:", after_kill)
        assert all(a.ok for a in answers), [a.failure for a in answers if not a.ok]
        assert stats.dead_lettered == 0
        assert service.triton.endpoints[victim.grpc_url].open
        # after the kill: at most one failed attempt per job in flight, then its circuit is open
        assert after_kill[victim.grpc_url] - killed_at <= settings.max_in_flight

        # restarted on the same ports: the probe closes its circuit and it gets work again
        victim.start()
        await asyncio.to_thread(victim.wait_ready)
        for _ in range(100):
            if not service.triton.endpoints[victim.grpc_url].open:
                break
            await asyncio.sleep(0.1)
        before = shares(service)[victim.grpc_url]
        answers = await burst(client, 12, tag="back")
        back = shares(service)
        print("rows per endpoint, after restart:", back)
    assert all(a.ok for a in answers)
    assert back[victim.grpc_url] > before


@contextlib.asynccontextmanager
async def delaying_proxy(target_port: int, delay_s: float) -> AsyncIterator[int]:
    """A TCP proxy that holds every chunk from the client `delay_s` before passing it on: a
    slow endpoint (network or server) as the orchestrator sees it."""

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        for t in (pipe(reader, up_writer, delay_s), pipe(up_reader, writer, 0.0)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_slow_endpoint_gets_less_work(
    kafka: Any, triton: Any, extra_tritons: list[TritonServer]
) -> None:
    fast = extra_tritons[1]
    async with delaying_proxy(triton.grpc_port, 0.08) as slow_port:
        slow = f"127.0.0.1:{slow_port}"
        settings = make_settings(
            kafka, triton, triton_url=f"{slow},{fast.grpc_url}", batching="naive", max_in_flight=8
        )
        async with running_service(settings) as service, client_for(settings) as client:
            answers = await burst(client, 16, tag="slow")
            spread = shares(service)
    print("rows per endpoint, one slow:", spread)
    assert all(a.ok for a in answers)
    assert spread[slow] < spread[fast.grpc_url] * 0.75, spread
