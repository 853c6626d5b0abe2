"""Schema registry mode through the real service, real Tansu and real tritonserver, against a
registry-compatible HTTP server run by the test (basic auth required, requests counted) that goes
down mid-run and comes back on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import fastavro
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.adapters.avro import RECORD_TYPES, REQUEST_SCHEMA, AvroCodec, frame
from orchestrator.adapters.schema_registry import (
    HttpSchemaRegistry,
    LocalSchemaDirectory,
    SchemaRegistryAuthError,
)
from orchestrator.domain import GenerationRequest
from orchestrator.service import Service
from tests.integration.service_harness import client_for, make_settings, running_service
from tests.registry_server import RegistryServer

pytestmark = pytest.mark.integration

USER, PASSWORD = "orchestrator", "s3cret-registry-password"
LOCAL = LocalSchemaDirectory()


def request_datum(request_id: str, seed: int) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "prompt": f"a lighthouse, take {seed}",
        "negative_prompt": "",
        "width": None,
        "height": None,
        "steps": 2,
        "guidance_scale": 5.0,
        "scheduler": "euler",
        "seed": seed,
        "num_images": 1,
    }


def encode_with(schema: dict[str, Any], schema_id: int, datum: dict[str, Any]) -> bytes:
    """A record as another producer writes it: its own writer schema, the registry's id."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), datum)
    return frame(schema_id, buffer.getvalue())


async def probe(service: Service) -> tuple[int, float | None]:
    """(/readyz status, orchestrator_consumption_paused{cause="schema_registry_down"})."""
    base = f"http://127.0.0.1:{service.http.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/readyz") as response:
            ready = response.status
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    paused = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "orchestrator_consumption_paused"
                and sample.labels.get("cause") == "schema_registry_down"
            ):
                paused = sample.value
    return ready, paused


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last is True:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s (last: {last})")


@contextlib.asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """How late 10 ms sleeps wake up while the block runs: a blocked loop shows here."""
    lags: list[float] = [0.0]

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    task = asyncio.create_task(tick())
    try:
        yield lags
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_registry_mode_resolves_caches_unknown_ids_and_waits_out_an_outage(
    kafka: Any, triton: Any
) -> None:
    registry = RegistryServer(USER, PASSWORD)
    await registry.start()
    settings = make_settings(
        kafka,
        triton,
        schema_registry_url=registry.url,
        schema_registry_username=USER,
        schema_registry_password=PASSWORD,
        schema_registry_timeout_s=1.0,
        schema_registry_negative_ttl_s=600,
        record_retry_initial_s=0.2,
        record_retry_max_s=1.0,
        max_in_flight=64,
    )
    client_codec = AvroCodec(HttpSchemaRegistry(registry.url, username=USER, password=PASSWORD))
    try:
        async with (
            running_service(settings) as service,
            client_for(settings, codec=client_codec) as client,
        ):
            # start-up registered the current schemas, with credentials
            assert set(registry.posts) == set(RECORD_TYPES)

            # -- a record written with the v1 schema, an id only the registry knows -----------
            v1_id = registry.add(LOCAL.schema(1), REQUEST_SCHEMA)
            await client.send_raw(encode_with(LOCAL.schema(1), v1_id, request_datum("v1", 1)), "v1")
            current = await client.send(GenerationRequest(prompt="now", steps=2, request_id="v2"))
            for rid in ("v1", current):
                answer = await client.wait(rid, 120)
                assert answer.ok, answer.reason
                assert answer.result is not None and answer.result.request_id == rid
            assert registry.gets[v1_id] == 1
            assert registry.unauthorized == 0 and len(registry.auth_headers) == 1

            # -- a stream of random unknown ids, with a good request in between; then the same
            # ids again, after they were dead-lettered: answered from the negative cache -------
            registry.delay_s = 0.2  # a slow registry: a blocking lookup would stall the loop
            unknown = random.Random(15).sample(range(10_000, 2**31), 20)
            async with loop_lag() as lags:
                for wave in (0, 1):
                    for i, schema_id in enumerate(unknown):
                        await client.send_raw(frame(schema_id, b"\x02\x04"), f"unknown-{wave}-{i}")
                        if wave == 0 and i == 10:
                            between = await client.send(
                                GenerationRequest(prompt="between", steps=2, request_id="between")
                            )
                    dead = await asyncio.gather(
                        *(client.wait(f"unknown-{wave}-{i}", 120) for i in range(20))
                    )
                    reasons = [a.failure and a.failure["reason"] for a in dead]
                    assert reasons == ["unknown_schema"] * 20
                    assert [registry.gets[i] for i in unknown] == [1] * 20, (
                        f"wave {wave}: more than one registry lookup per unknown id"
                    )
                good = await client.wait(between, 120)
            assert good.ok, good.reason
            assert max(lags) < 1.0, f"the event loop stalled {max(lags):.2f} s"
            registry.delay_s = 0.0

            # -- the registry goes down: records wait, nothing is dead-lettered ---------------
            variant = dict(LOCAL.schema(2))  # a writer without `metadata` (the reader defaults it)
            variant["fields"] = [f for f in variant["fields"] if f["name"] != "metadata"]
            variant_id = registry.add(variant, REQUEST_SCHEMA)
            await registry.stop()
            waiting = [f"outage-{i}" for i in range(3)]
            for i, rid in enumerate(waiting):
                await client.send_raw(encode_with(variant, variant_id, request_datum(rid, i)), rid)

            async def paused() -> Any:
                ready, flag = await probe(service)
                return (ready, flag) == (503, 1.0) or (ready, flag)

            await eventually(paused, 20, "readiness 503 and the pause metric at 1")
            await asyncio.sleep(3.0)  # records would be dead-lettered by now if they were
            assert not set(waiting) & set(client.watcher.answered), "answered while it was down"
            assert (await probe(service)) == (503, 1.0)

            # -- the registry comes back on the same port: the waiting records are answered --
            await registry.start()
            for rid in waiting:
                answer = await client.wait(rid, 120)
                assert answer.ok, answer.reason
                assert answer.result is not None and answer.result.metadata == {}
            assert registry.gets[variant_id] == 1

            async def resumed() -> Any:
                ready, flag = await probe(service)
                return (ready, flag) == (200, 0.0) or (ready, flag)

            await eventually(resumed, 20, "readiness 200 and the pause metric at 0")
            assert client.watcher.duplicates == {}, "an outage record was answered twice"
            assert registry.unauthorized == 0
    finally:
        await client_codec.aclose()
        await registry.stop()


async def test_wrong_registry_credentials_stop_the_service_at_start(
    kafka: Any, triton: Any
) -> None:
    async with RegistryServer(USER, PASSWORD) as registry:
        settings = make_settings(
            kafka,
            triton,
            schema_registry_url=registry.url,
            schema_registry_username=USER,
            schema_registry_password="not-the-password",
        )
        with pytest.raises(SchemaRegistryAuthError, match="refused our credentials") as info:
            async with running_service(settings):
                pass
    assert "HTTP 401" in str(info.value)
    assert "not-the-password" not in str(info.value)
    assert registry.unauthorized >= 1 and not registry.schemas
