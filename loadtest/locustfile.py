"""Locust load test of the orchestrator through Kafka, measuring END-TO-END latency.

Each simulated user sends one Avro `GenerationRequest` to the request topic (with a
`correlation_id` header) and waits for ITS answer: the result on the response topic or the dead
letter on the DLQ topic, matched by correlation id. The time reported to Locust runs from just
before the produce until that answer is consumed, so it covers queueing, all model calls and the
reply; a produce acknowledgement is not the end. Dead letters and timeouts are reported as
failures.

Kafka and the topics come from the same `ORCHESTRATOR_*` variables as the service
(`ORCHESTRATOR_BOOTSTRAP_SERVERS`, `ORCHESTRATOR_REQUEST_TOPIC`, `ORCHESTRATOR_RESPONSE_TOPIC`,
`ORCHESTRATOR_DLQ_TOPIC`, SASL/TLS settings); the request from `LOADTEST_*` variables:

    LOADTEST_PROMPT       prompt (default: a few fixed prompts in turn)
    LOADTEST_STEPS        sampling steps (20)
    LOADTEST_SCHEDULER    scheduler (pndm)
    LOADTEST_GUIDANCE     guidance scale (7.5)
    LOADTEST_WIDTH/HEIGHT image size (the model's default)
    LOADTEST_NUM_IMAGES   images per request (1)
    LOADTEST_TIMEOUT_S    how long one request may take before it counts as failed (300)
    LOADTEST_THINK_S      pause between a user's requests (0: closed loop)
    LOADTEST_ENV_FILE     settings file with ORCHESTRATOR_* lines (as `serve --env-file`)
    LOADTEST_SUMMARY      write a JSON summary (sent, answered, failures, latencies) to this file

Locust runs on gevent; the orchestrator's asyncio `Client` runs on one asyncio loop that lives
in its own greenlet (the selector is gevent's), shared by all users of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import gevent
import gevent.lock
from locust import User, constant, events, task
from locust.env import Environment

from orchestrator.adapters.avro import make_codec
from orchestrator.adapters.kafka import KafkaSettings
from orchestrator.client import Answer, Client
from orchestrator.config import Settings, load_settings
from orchestrator.domain import GenerationRequest

T = TypeVar("T")

PROMPTS = (
    "a red fox in the snow, highly detailed",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen, studio photograph",
    "an astronaut riding a horse on the moon",
)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def kafka_settings_from(settings: Settings) -> KafkaSettings:
    """The Kafka connection of the service's settings (bootstrap, security, SASL, TLS)."""
    return settings.kafka("-loadtest")


class AsyncBridge:
    """An asyncio loop running in a greenlet; other greenlets submit coroutines and wait."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._pending.add(future)
        try:
            return future.result(timeout)
        except BaseException:  # timeout, or the user's greenlet killed at the end of the run
            future.cancel()
            raise
        finally:
            self._pending.discard(future)

    def cancel_pending(self) -> None:
        """Cancel the coroutines of users that were stopped while waiting for an answer."""
        for future in list(self._pending):
            future.cancel()
        self.call(asyncio.sleep(0.05), timeout=5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._greenlet.join(timeout=5)


class Shared:
    """The process-wide Kafka client and the run's tallies (one per Locust process)."""

    lock = gevent.lock.Semaphore()
    bridge: AsyncBridge | None = None
    client: Client | None = None
    sent = 0
    answered = 0
    failed: dict[str, int] = {}  # noqa: RUF012 - process-wide tallies
    timeouts = 0
    latencies_s: list[float] = []  # noqa: RUF012

    @classmethod
    def get(cls) -> tuple[AsyncBridge, Client]:
        with cls.lock:
            if cls.client is None:
                settings = load_settings(os.environ.get("LOADTEST_ENV_FILE") or None)
                bridge = AsyncBridge()
                client = Client(
                    kafka_settings_from(settings),
                    request_topic=settings.request_topic,
                    response_topic=settings.response_topic,
                    dlq_topic=settings.dlq_topic,
                    codec=make_codec(settings),  # the service's schema ids (local or registry)
                    max_record_bytes=settings.max_request_bytes,
                )
                bridge.call(client.start(), timeout=60)
                cls.bridge, cls.client = bridge, client
            assert cls.bridge is not None
            return cls.bridge, cls.client

    @classmethod
    def close(cls) -> None:
        with cls.lock:
            if cls.client is not None and cls.bridge is not None:
                try:
                    cls.bridge.cancel_pending()
                    cls.bridge.call(cls.client.stop(), timeout=30)
                finally:
                    cls.bridge.close()
            cls.client = cls.bridge = None

    @classmethod
    def summary(cls) -> dict[str, Any]:
        lat = sorted(cls.latencies_s)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        duplicates = sum(cls.client.watcher.duplicates.values()) if cls.client else 0
        return {
            "sent": cls.sent,
            "answered": cls.answered,
            "failed": dict(cls.failed),
            "timeouts": cls.timeouts,
            "duplicates": duplicates,
            "latency_s": {
                "count": len(lat),
                "mean": statistics.fmean(lat) if lat else None,
                "p50": pct(0.50),
                "p95": pct(0.95),
                "p99": pct(0.99),
                "max": lat[-1] if lat else None,
            },
        }


_prompt_cycle = itertools.cycle(PROMPTS)


def make_request() -> GenerationRequest:
    return GenerationRequest(
        prompt=os.environ.get("LOADTEST_PROMPT") or next(_prompt_cycle),
        seed=random.randrange(2**31),
        steps=_env_int("LOADTEST_STEPS") or 20,
        scheduler=os.environ.get("LOADTEST_SCHEDULER") or "pndm",
        guidance_scale=_env_float("LOADTEST_GUIDANCE", 7.5),
        width=_env_int("LOADTEST_WIDTH"),
        height=_env_int("LOADTEST_HEIGHT"),
        num_images=_env_int("LOADTEST_NUM_IMAGES") or 1,
        request_id=uuid.uuid4().hex,
    )


class DiffusionUser(User):
    """Sends one request, waits for its answer (closed loop), reports end-to-end latency."""

    wait_time = constant(_env_float("LOADTEST_THINK_S", 0.0))
    timeout_s = _env_float("LOADTEST_TIMEOUT_S", 300.0)

    def on_start(self) -> None:
        self.bridge, self.client = Shared.get()

    @task
    def generate(self) -> None:
        request = make_request()
        name = f"generate {request.steps} steps"
        start = time.perf_counter()
        exception: Exception | None = None
        length = 0
        Shared.sent += 1
        try:
            answer: Answer = self.bridge.call(
                self.client.generate(request, timeout=self.timeout_s), timeout=self.timeout_s + 30
            )
        except TimeoutError as exc:
            Shared.timeouts += 1
            exception = TimeoutError(f"no answer in {self.timeout_s:.0f} s ({exc!r})")
            elapsed = time.perf_counter() - start
        else:
            # latency_s runs from just before the produce until the answer was consumed
            elapsed = answer.latency_s or (time.perf_counter() - start)
            if answer.ok and answer.result is not None:
                Shared.answered += 1
                Shared.latencies_s.append(elapsed)
                length = sum(len(img.png or b"") for img in answer.result.images)
            else:
                reason = (answer.failure or {}).get("reason") or "unknown"
                Shared.failed[reason] = Shared.failed.get(reason, 0) + 1
                exception = RuntimeError(f"dead-lettered: {answer.reason}")
        self.environment.events.request.fire(
            request_type="kafka",
            name=name,
            response_time=elapsed * 1000.0,
            response_length=length,
            exception=exception,
            context={"request_id": request.request_id},
        )


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    summary = Shared.summary()
    print("loadtest summary: " + json.dumps(summary), flush=True)
    path = os.environ.get("LOADTEST_SUMMARY")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    Shared.close()


# Importing the orchestrator takes seconds during which gevent's loop did not run: refresh its
# clock, or Locust's --run-time timer (scheduled from the stale time) would fire early.
gevent.get_hub().loop.update_now()
