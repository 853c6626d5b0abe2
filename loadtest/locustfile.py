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

The HTTP gateway path (`orchestrator gateway`) has two users beside the Kafka one, active when
`LOADTEST_GATEWAY_URL` is set (e.g. http://127.0.0.1:8080), with the bearer key in
`LOADTEST_GATEWAY_KEY`:

    GatewaySyncUser       POST /v1/images/generations; the answer is the end
    GatewayEventsUser     POST /v1/jobs, then GET /v1/jobs/{id}/events until its `outcome`

Each reports its HTTP calls (as Locust's HttpUser does) and one more request event per job,
type `e2e`, timed from just before the POST until the image is known (the sync answer, or the
events stream's `outcome` event). Run only them by naming them after the file
(`locust -f loadtest/locustfile.py GatewaySyncUser GatewayEventsUser ...`).

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
from locust import HttpUser, User, constant, events, task
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


GATEWAY_URL = os.environ.get("LOADTEST_GATEWAY_URL", "").strip()


class GatewayTally:
    """Per gateway user class: jobs sent, succeeded, failed, and end-to-end latencies."""

    tallies: dict[str, dict[str, Any]] = {}  # noqa: RUF012 - process-wide tallies

    @classmethod
    def of(cls, name: str) -> dict[str, Any]:
        return cls.tallies.setdefault(
            name, {"sent": 0, "succeeded": 0, "failed": {}, "latencies_s": []}
        )

    @classmethod
    def summary(cls) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, t in cls.tallies.items():
            lat = sorted(t["latencies_s"])
            out[name] = {
                "sent": t["sent"],
                "succeeded": t["succeeded"],
                "failed": dict(t["failed"]),
                "latency_s": {
                    "count": len(lat),
                    "p50": lat[int(0.50 * (len(lat) - 1))] if lat else None,
                    "p95": lat[int(0.95 * (len(lat) - 1))] if lat else None,
                    "max": lat[-1] if lat else None,
                },
            }
        return out


def gateway_body() -> dict[str, Any]:
    """The JSON body of one gateway request, from the same LOADTEST_* variables."""
    body: dict[str, Any] = {
        "prompt": os.environ.get("LOADTEST_PROMPT") or next(_prompt_cycle),
        "seed": random.randrange(2**31),
        "steps": _env_int("LOADTEST_STEPS") or 20,
        "scheduler": os.environ.get("LOADTEST_SCHEDULER") or "pndm",
        "guidance_scale": _env_float("LOADTEST_GUIDANCE", 7.5),
        "n": _env_int("LOADTEST_NUM_IMAGES") or 1,
        "response_format": "url",
    }
    width, height = _env_int("LOADTEST_WIDTH"), _env_int("LOADTEST_HEIGHT")
    if width and height:
        body["size"] = f"{width}x{height}"
    return body


class _GatewayUser(HttpUser):
    abstract = True
    host = GATEWAY_URL or None
    wait_time = constant(_env_float("LOADTEST_THINK_S", 0.0))
    timeout_s = _env_float("LOADTEST_TIMEOUT_S", 300.0)
    path = "gateway"

    def on_start(self) -> None:
        key = os.environ.get("LOADTEST_GATEWAY_KEY", "")
        self.client.headers["Authorization"] = f"Bearer {key}"

    def _job(self, body: dict[str, Any]) -> tuple[str | None, int]:
        """Run one job; (the failure, or None, and the response length)."""
        raise NotImplementedError

    @task
    def generate(self) -> None:
        body = gateway_body()
        tally = GatewayTally.of(type(self).__name__)
        tally["sent"] += 1
        start = time.perf_counter()
        try:
            failure, length = self._job(body)
        except Exception as exc:  # the connection broke, a bad stream...
            failure, length = f"{type(exc).__name__}: {exc}", 0
        elapsed = time.perf_counter() - start
        if failure is None:
            tally["succeeded"] += 1
            tally["latencies_s"].append(elapsed)
        else:
            tally["failed"][failure[:80]] = tally["failed"].get(failure[:80], 0) + 1
        self.environment.events.request.fire(
            request_type="e2e",
            name=f"{self.path} {body['steps']} steps",
            response_time=elapsed * 1000.0,
            response_length=length,
            exception=None if failure is None else RuntimeError(failure),
            context={},
        )


class GatewaySyncUser(_GatewayUser):
    """POST /v1/images/generations and wait for the OpenAI-shaped answer (closed loop)."""

    abstract = not GATEWAY_URL
    path = "gateway sync"

    def _job(self, body: dict[str, Any]) -> tuple[str | None, int]:
        with self.client.post(
            "/v1/images/generations", json=body, timeout=self.timeout_s, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return f"HTTP {r.status_code}", 0
            data = r.json().get("data") or []
            if len(data) != body["n"]:
                r.failure(f"{len(data)} images for n={body['n']}")
                return "wrong image count", 0
            return None, len(r.content or b"")


class GatewayEventsUser(_GatewayUser):
    """POST /v1/jobs (202), then follow GET /v1/jobs/{id}/events to its `outcome` event."""

    abstract = not GATEWAY_URL
    path = "gateway events"

    def _job(self, body: dict[str, Any]) -> tuple[str | None, int]:
        with self.client.post("/v1/jobs", json=body, catch_response=True) as r:
            if r.status_code != 202:
                r.failure(f"HTTP {r.status_code}")
                return f"POST HTTP {r.status_code}", 0
            job_id = r.json()["id"]
        outcome: dict[str, Any] | None = None
        length = 0
        with self.client.get(
            f"/v1/jobs/{job_id}/events",
            name="/v1/jobs/[id]/events",
            stream=True,
            timeout=self.timeout_s,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return f"events HTTP {r.status_code}", 0
            event = ""
            for raw in r.iter_lines(decode_unicode=True):
                line = raw or ""
                length += len(line) + 1
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: ") and event == "outcome":
                    outcome = json.loads(line[len("data: ") :])
                    break
            if outcome is None:
                r.failure("stream ended without an outcome")
                return "no outcome", length
        if outcome.get("status") != "succeeded":
            return f"job {outcome.get('status')}", length
        return None, length


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    summary = Shared.summary()
    summary["gateway"] = GatewayTally.summary()
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
