"""Run the real service in-process against real Tansu and tritonserver, one topic set per test."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from orchestrator.adapters.kafka_broker import create_topics
from orchestrator.client import Client
from orchestrator.config import Settings, load_settings
from orchestrator.service import Service, kafka_settings


def make_settings(kafka: Any, triton: Any, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "triton_url": triton.grpc_url,
        "request_topic": f"req-{tag}",
        "response_topic": f"resp-{tag}",
        "dlq_topic": f"dlq-{tag}",
        "progress_topic": f"progress-{tag}",
        "control_topic": f"control-{tag}",
        "encoded_topic": f"encoded-{tag}",
        "denoised_topic": f"denoised-{tag}",
        "group_id": f"group-{tag}",
        "session_timeout_ms": 2000,
        "heartbeat_interval_ms": 300,
        "rebalance_timeout_ms": 2000,
        "triton_timeout_s": 30.0,
        "http_port": 0,
        "http_host": "127.0.0.1",
    }
    base.update(overrides)
    return load_settings(None, **base)


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings, partitions: int = 2, **service_kwargs: Any
) -> AsyncIterator[Service]:
    await create_topics(
        settings.bootstrap_servers,
        settings.service_topics(),
        partitions=partitions,
    )
    ready = asyncio.Event()
    service = Service(settings, on_ready=ready.set, **service_kwargs)
    task = asyncio.create_task(service.run())
    try:
        done, _ = await asyncio.wait(
            [task, asyncio.create_task(ready.wait())], timeout=60, return_when="FIRST_COMPLETED"
        )
        if task in done:
            task.result()  # raises the start-up failure
        assert ready.is_set(), "service did not become ready in 60 s"
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)


STAGE_ROLES = ("encode", "denoise", "decode")


@contextlib.asynccontextmanager
async def running_roles(
    settings: Settings,
    partitions: int = 2,
    roles: tuple[str, ...] = STAGE_ROLES,
    **service_kwargs: Any,
) -> AsyncIterator[dict[str, Service]]:
    """One in-process Service per stage role (`--role encode`, ...) on the same topics."""
    async with contextlib.AsyncExitStack() as stack:
        services = {}
        for role in roles:
            services[role] = await stack.enter_async_context(
                running_service(
                    settings.model_copy(update={"role": role}), partitions, **service_kwargs
                )
            )
        yield services


@contextlib.asynccontextmanager
async def client_for(settings: Settings, **client_kwargs: Any) -> AsyncIterator[Client]:
    client = Client(
        kafka_settings(settings),
        request_topic=settings.request_topic,
        response_topic=settings.response_topic,
        dlq_topic=settings.dlq_topic,
        **client_kwargs,
    )
    await client.start()
    try:
        yield client
    finally:
        await client.stop()
