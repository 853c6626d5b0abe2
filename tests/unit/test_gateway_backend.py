"""The gateway backend's waiting and publishing rules, and the server's parser and loop choice,
without a broker: records are applied to the book as the tail would apply them, and the
producer is replaced by a recorder (the real publishing is tests/integration/test_gateway.py's)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.adapters.avro import AvroCodec, ProgressEventRecord
from orchestrator.adapters.kafka import KafkaSettings, OutgoingRecord
from orchestrator.domain import GenerationRequest, JobEvent
from orchestrator.errors import PublishError
from orchestrator.gateway import server
from orchestrator.gateway.backend import Backend, KafkaUnavailable
from orchestrator.gateway.jobs import Registration
from orchestrator.gateway.settings import GatewaySettings


def _backend() -> Backend:
    return Backend(
        KafkaSettings(),
        AvroCodec(),
        request_topic="req",
        reply_topic="resp",
        response_topics=["resp"],
        dlq_topic="dlq",
        progress_topic="progress",
        control_topic="control",
        registry_topic="registry",
        lookback_s=60,
    )


def _step(job_id: str, step: int) -> ProgressEventRecord:
    return ProgressEventRecord(job_id, JobEvent.STEP, 1000 + step, step=step, steps=4)


async def test_a_record_wakes_the_waiters_of_its_job_only() -> None:
    backend = _backend()
    a = asyncio.create_task(backend.wait_job("gw-a", 5.0, version=0))
    b = asyncio.create_task(backend.wait_job("gw-b", 5.0, version=0))
    await asyncio.sleep(0)
    assert set(backend._waiters) == {"gw-a", "gw-b"}
    backend.book.progress(_step("gw-a", 1))
    backend.book.progress(_step("gw-b", 1))  # changed, but its waiter is not woken
    backend._wake({"gw-a"})
    job = await asyncio.wait_for(a, 1.0)
    assert job is not None and job.step == 1
    await asyncio.sleep(0.05)
    assert not b.done() and set(backend._waiters) == {"gw-b"}
    backend._wake({"gw-b"})
    await asyncio.wait_for(b, 1.0)
    assert backend._waiters == {}


async def test_a_waiter_woken_before_its_change_waits_again_and_times_out_clean() -> None:
    backend = _backend()
    backend.book.progress(_step("gw-a", 1))
    version = backend.book.jobs["gw-a"].version
    waiter = asyncio.create_task(backend.wait_job("gw-a", 0.3, version=version))
    await asyncio.sleep(0)
    backend._wake({"gw-a"})  # woken, but the job did not change: it waits on
    await asyncio.sleep(0.05)
    assert not waiter.done() and len(backend._waiters["gw-a"]) == 1
    job = await asyncio.wait_for(waiter, 1.0)  # the timeout answers the job as it is
    assert job is not None and job.version == version
    assert backend._waiters == {}


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    backend = _backend()
    waiter = asyncio.create_task(backend.wait_job("gw-a", 5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert backend._waiters == {}


class _Published:
    """Stands in for the backend's producer: records the topics, fails those in `failing`."""

    def __init__(self, failing: set[str]) -> None:
        self.failing = failing
        self.topics: list[str] = []
        self.most_in_flight = 0

    async def publish_together(
        self, records: list[OutgoingRecord], timeout_s: float
    ) -> list[object]:
        self.topics += [r.topic for r in records]
        self.most_in_flight = max(self.most_in_flight, len(records))
        await asyncio.sleep(0.01)
        return [PublishError(r.topic) if r.topic in self.failing else r for r in records]

    async def publish(self, topic: str, value: bytes, key: bytes, headers: list[Any]) -> None:
        self.topics.append(topic)
        if topic in self.failing:
            raise PublishError(topic)


def _job(backend: Backend, failing: set[str]) -> tuple[_Published, Registration]:
    published = _Published(failing)
    backend.producer = published  # type: ignore[assignment]
    reg = Registration(job_id="gw-1", owner="alice", created_ms=1, body_sha256="h")
    return published, reg


async def test_submit_publishes_registration_and_request_at_once() -> None:
    backend = _backend()
    published, reg = _job(backend, set())
    await backend.submit(reg, GenerationRequest(prompt="p", request_id="gw-1"), [])
    assert sorted(published.topics) == ["registry", "req"] and published.most_in_flight == 2
    job = backend.book.get("gw-1")
    assert job is not None and job.registration == reg


async def test_a_request_sent_without_its_registration_is_cancelled() -> None:
    backend = _backend()
    published, reg = _job(backend, {"registry"})
    with pytest.raises(KafkaUnavailable):
        await backend.submit(reg, GenerationRequest(prompt="p", request_id="gw-1"), [])
    assert published.topics[-1] == "control" and backend.book.get("gw-1") is None


async def test_a_request_not_sent_answers_503_and_cancels_nothing() -> None:
    backend = _backend()
    published, reg = _job(backend, {"req"})
    with pytest.raises(KafkaUnavailable):
        await backend.submit(reg, GenerationRequest(prompt="p", request_id="gw-1"), [])
    assert "control" not in published.topics


def test_server_takes_httptools_and_uvloop_and_falls_back_without_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvloop

    auto = GatewaySettings()
    assert server.http_parser(auto) == "httptools"
    assert server.loop_factory(auto) is uvloop.new_event_loop
    assert server.http_parser(GatewaySettings(http="h11")) == "h11"
    assert server.loop_factory(GatewaySettings(loop="asyncio")) is None
    monkeypatch.setattr(server, "_installed", lambda module: False)
    with caplog.at_level("WARNING", logger="orchestrator.gateway"):
        assert server.http_parser(auto) == "h11"
        assert server.loop_factory(auto) is None
    assert "httptools is not installed" in caplog.text and "uvloop is not installed" in caplog.text
