"""The HTTP gateway end to end (issue 11): real Tansu, real tritonserver, the real service
in-process and two real `orchestrator gateway` processes (uvicorn) sharing one job registry.

Jobs are submitted through one replica and followed, fetched and cancelled through the other;
a replica restarted mid-run serves the job again from the topics. Keys, limits and bad input are
checked against the real processes; Kafka down is a broker of its own that the test stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest

from orchestrator.adapters.child_process import GroupGuard, free_port, stop_process_group
from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.config import Settings
from orchestrator.gateway.webhook import SIGNATURE_HEADER, verify
from tests.integration.service_harness import make_settings, running_service

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = {
    "alice": "alice-key-1",
    "bob": "bob-key-2",
    "carol": "carol-key-3",
    "slow": "slow-key-4",
    "edge": "edge-key-5",  # the edge tests': many requests in a row, never rate limited
}
WEBHOOK_SECRET = "whsec-test"


def _keys_file(path: Path) -> Path:
    entries: list[dict[str, Any]] = [
        {"id": "alice", "sha256": hashlib.sha256(KEYS["alice"].encode()).hexdigest()},
        {"id": "bob", "sha256": hashlib.sha256(KEYS["bob"].encode()).hexdigest()},
        {
            "id": "carol",
            "sha256": hashlib.sha256(KEYS["carol"].encode()).hexdigest(),
            "routes": ["images"],
        },
        {
            "id": "slow",
            "sha256": hashlib.sha256(KEYS["slow"].encode()).hexdigest(),
            "rate_per_s": 0.2,
            "burst": 2,
        },
        {
            "id": "edge",
            "sha256": hashlib.sha256(KEYS["edge"].encode()).hexdigest(),
            "rate_per_s": 1000,
            "burst": 1000,
        },
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


class Gateway:
    """One `orchestrator gateway` child process (dies with the test)."""

    def __init__(self, tmp: Path, settings: Settings, registry: str, keys: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"gateway-{self.port}-{uuid.uuid4().hex[:4]}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        self.env.update(
            {
                "ORCHESTRATOR_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
                "ORCHESTRATOR_REQUEST_TOPIC": settings.request_topic,
                "ORCHESTRATOR_RESPONSE_TOPIC": settings.response_topic,
                "ORCHESTRATOR_DLQ_TOPIC": settings.dlq_topic,
                "ORCHESTRATOR_PROGRESS_TOPIC": settings.progress_topic,
                "ORCHESTRATOR_CONTROL_TOPIC": settings.control_topic,
                "ORCHESTRATOR_OUTPUT_DIR": str(settings.output_dir),
                "ORCHESTRATOR_TRACING": "false",
                "ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC": registry,
                "ORCHESTRATOR_GATEWAY_KEYS_FILE": str(keys),
                "ORCHESTRATOR_GATEWAY_MAX_BODY_BYTES": "65536",
                "ORCHESTRATOR_GATEWAY_SYNC_WAIT_S": "120",
                "ORCHESTRATOR_GATEWAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "ORCHESTRATOR_GATEWAY_WEBHOOK_BACKOFF_S": "0.2",
                "ORCHESTRATOR_GATEWAY_KAFKA_TIMEOUT_MS": "2000",
            }
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.guard: GroupGuard | None = None

    def start(self) -> None:
        """Not started with `spawn()`: its parent-death signal needs Python code run in the
        forked child (a preexec_fn), and with this process's service and tracer threads running
        the child's at-fork handlers can crash it (seen: OpenTelemetry's, a segfault). A plain
        Popen in a session of its own, with a GroupGuard that kills the session when this
        process dies, runs no Python in the child."""
        command = [sys.executable, "-m", "orchestrator", "gateway", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=self.env,
                start_new_session=True,
            )
        self.guard = GroupGuard(self.process.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self, timeout: float = 90.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                code = self.process.poll()
                assert code is None, f"gateway exited with {code}:\n{self.output()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                assert time.monotonic() < deadline, f"gateway not ready:\n{self.output()}"
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout=10)
        if self.guard is not None:
            self.guard.release()
            self.guard = None


@dataclass
class Stack:
    settings: Settings
    a: Gateway
    b: Gateway
    http: aiohttp.ClientSession
    tmp: Path


@pytest.fixture(scope="module")
async def stack(
    kafka: Any, triton: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway")
    settings = make_settings(
        kafka,
        triton,
        progress_step_events_per_s=1000.0,
        preview_interval_s=0.001,
        output_dir=tmp / "images",
    )
    registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
    await create_topics(settings.bootstrap_servers, [registry], partitions=2)
    keys = _keys_file(tmp / "keys.json")
    async with running_service(settings):
        a = Gateway(tmp, settings, registry, keys)
        b = Gateway(tmp, settings, registry, keys)
        try:
            a.start()
            b.start()
            await a.ready()
            await b.ready()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
                yield Stack(settings, a, b, http, tmp)
        finally:
            a.stop()
            b.stop()


async def read_events(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], stop_after: int | None = None
) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of an SSE stream until its `outcome` (or `stop_after` events)."""
    events: list[tuple[str | None, str, dict[str, Any]]] = []
    async with http.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        block: dict[str, str] = {}
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line:
                name, _, value = line.partition(": ")
                block[name] = value
                continue
            if "data" in block:
                events.append((block.get("id"), block["event"], json.loads(block["data"])))
                if block["event"] == "outcome" or (stop_after and len(events) >= stop_after):
                    return events
            block = {}
    raise AssertionError(f"stream ended without an outcome: {events}")


async def post_job(
    stack: Stack, gw: Gateway, body: dict[str, Any], who: str = "alice", **headers: str
) -> tuple[int, dict[str, Any]]:
    async with stack.http.post(
        f"{gw.url}/v1/jobs", json=body, headers={**auth(who), **headers}
    ) as r:
        return r.status, await r.json()


# ---------------------------------------------------------------------------------------------


async def test_sync_generation_answers_openai_shape_b64_and_url(stack: Stack) -> None:
    body = {"prompt": "a red kite", "steps": 3, "seed": 7, "response_format": "b64_json"}
    async with stack.http.post(
        f"{stack.a.url}/v1/images/generations", json=body, headers=auth("alice")
    ) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert isinstance(answer["created"], int) and len(answer["data"]) == 1
    png = base64.b64decode(answer["data"][0]["b64_json"])
    assert png.startswith(PNG)

    body = {"prompt": "a red kite", "steps": 3, "seed": 7, "n": 2, "response_format": "url"}
    async with stack.http.post(
        f"{stack.a.url}/v1/images/generations", json=body, headers=auth("alice")
    ) as r:
        assert r.status == 200, await r.text()
        urls = [d["url"] for d in (await r.json())["data"]]
    assert len(urls) == 2
    # the image is served by the OTHER replica too, with its content type and cache headers
    async with stack.http.get(f"{stack.b.url}{urls[0]}", headers=auth("alice")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/png"
        assert "max-age" in r.headers["Cache-Control"] and r.headers["ETag"]
        assert (await r.read()) == png  # same seed, same prompt, same first image
        etag = r.headers["ETag"]
    for tags in (etag, f'"other", W/{etag}', "*"):
        async with stack.http.get(
            f"{stack.b.url}{urls[0]}", headers={**auth("alice"), "If-None-Match": tags}
        ) as r:
            assert r.status == 304, tags
            assert r.headers["ETag"] == etag and "max-age" in r.headers["Cache-Control"]
            assert await r.read() == b""
    async with stack.http.get(
        f"{stack.b.url}{urls[0]}", headers={**auth("alice"), "If-None-Match": '"other"'}
    ) as r:
        assert r.status == 200 and (await r.read()) == png
    async with stack.http.head(f"{stack.b.url}{urls[0]}", headers=auth("alice")) as r:
        assert r.status == 200 and r.headers["ETag"] == etag
        assert r.headers["Content-Type"] == "image/png"
        assert int(r.headers["Content-Length"]) == len(png) and await r.read() == b""
    async with stack.http.get(f"{stack.b.url}{urls[0]}", headers=auth("bob")) as r:
        assert r.status == 404


async def test_async_job_followed_on_the_other_replica_with_resume(stack: Stack) -> None:
    status, job = await post_job(
        stack,
        stack.a,
        {"prompt": "a lighthouse", "steps": 6, "scheduler": "euler", "preview": True},
    )
    assert status == 202, job
    assert job["status"] in ("queued", "running") and job["urls"]["events"].endswith("/events")
    events_url = f"{stack.b.url}/v1/jobs/{job['id']}/events?previews=true"
    events = await read_events(stack.http, events_url, auth("alice"))
    kinds = [e[1] for e in events]
    assert kinds[-1] == "outcome" and events[-1][2]["status"] == "succeeded"
    steps = [e[2]["step"] for e in events if e[1] == "progress" and e[2]["event"] == "step"]
    assert steps == sorted(steps) and steps[-1] == 6, events
    assert any("previews" in e[2] for e in events if e[1] == "progress")
    ids = [int(e[0]) for e in events if e[0] is not None]
    assert ids == list(range(1, len(ids) + 1))
    # reconnect with Last-Event-ID: the rest of the stream, then the outcome
    mid = ids[len(ids) // 2]
    resumed = await read_events(
        stack.http, events_url, {**auth("alice"), "Last-Event-ID": str(mid)}
    )
    assert [int(e[0]) for e in resumed if e[0] is not None] == ids[mid:]
    assert resumed[-1][1] == "outcome"
    async with stack.http.get(f"{stack.b.url}/v1/jobs/{job['id']}", headers=auth("alice")) as r:
        state = await r.json()
    assert state["status"] == "succeeded" and state["progress"] == {"step": 6, "steps": 6}
    assert state["images"] and state["finished_at"] >= state["created_at"]


async def test_prefer_wait_answers_the_finished_job(stack: Stack) -> None:
    status, job = await post_job(stack, stack.b, {"prompt": "a boat", "steps": 2}, Prefer="wait=60")
    assert status == 200 and job["status"] == "succeeded", job
    assert job["images"][0]["url"].startswith(f"/v1/images/{job['id']}/")


async def test_cancel_through_the_other_replica(stack: Stack) -> None:
    status, job = await post_job(
        stack, stack.a, {"prompt": "a very long job", "steps": 150, "scheduler": "euler"}
    )
    assert status == 202
    url = f"{stack.b.url}/v1/jobs/{job['id']}/events"
    first = await read_events(stack.http, url, auth("alice"), stop_after=1)
    assert first
    async with stack.http.post(
        f"{stack.b.url}/v1/jobs/{job['id']}/cancel", headers=auth("alice")
    ) as r:
        assert r.status == 202, await r.text()
    events = await read_events(stack.http, url, auth("alice"))
    assert events[-1][2]["status"] == "cancelled", events[-3:]
    # replica a learns the outcome from its own tail of the topics: it converges within about
    # a fetch wait of b, not at the same instant
    deadline = time.monotonic() + 5.0
    while True:
        async with stack.http.get(f"{stack.a.url}/v1/jobs/{job['id']}", headers=auth("alice")) as r:
            state = await r.json()
        if state["status"] == "cancelled" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert state["status"] == "cancelled" and state["images"] == []
    assert state["progress"]["step"] < 150


async def test_idempotency_key_on_any_replica(stack: Stack) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    body = {"prompt": "a pear", "steps": 2, "seed": 3}
    s1, j1 = await post_job(stack, stack.a, body, **{"Idempotency-Key": key})
    s2, j2 = await post_job(stack, stack.b, body, **{"Idempotency-Key": key})
    assert s1 == 202 and s2 == 200 and j1["id"] == j2["id"]
    s3, j3 = await post_job(stack, stack.a, {**body, "seed": 4}, **{"Idempotency-Key": key})
    assert s3 == 422 and j3["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    # another key's same Idempotency-Key is its own job
    s4, j4 = await post_job(stack, stack.a, body, who="bob", **{"Idempotency-Key": key})
    assert s4 == 202 and j4["id"] != j1["id"]


async def test_keys_routes_and_owners(stack: Stack) -> None:
    url = f"{stack.a.url}/v1/jobs"
    async with stack.http.post(url, json={"prompt": "x"}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    async with stack.http.post(
        url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}
    ) as r:
        assert r.status == 401
    async with stack.http.post(url, json={"prompt": "x"}, headers=auth("carol")) as r:
        assert r.status == 403
    status, job = await post_job(stack, stack.a, {"prompt": "mine", "steps": 2})
    assert status == 202
    for path in ("", "/events"):
        async with stack.http.get(
            f"{stack.b.url}/v1/jobs/{job['id']}{path}", headers=auth("bob")
        ) as r:
            assert r.status == 404
    async with stack.http.post(
        f"{stack.b.url}/v1/jobs/{job['id']}/cancel", headers=auth("bob")
    ) as r:
        assert r.status == 404
    async with stack.http.get(f"{stack.b.url}/v1/jobs/gw-none", headers=auth("alice")) as r:
        assert r.status == 404


async def test_bad_input_413_422_429(stack: Stack) -> None:
    url = f"{stack.a.url}/v1/jobs"
    async with stack.http.post(
        url,
        data=b"{" + b" " * 70_000 + b"}",
        headers={**auth("alice"), "Content-Type": "application/json"},
    ) as r:
        assert r.status == 413
    cases = [
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "steps": 100_000}, "steps"),
        ({"prompt": "x", "steps": 151}, "steps"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "size": "64x64\n"}, "size"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 99}, "n"),
        # refused here, as the service would refuse them (not a 202 and a failed job)
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "x", "scheduler": "nope"}, "scheduler"),
        # wrong JSON types are refused, not cast
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "steps": 2.0}, "steps"),
        ({"prompt": "x", "seed": "7"}, "seed"),
        ({"prompt": "x", "preview": "yes"}, "preview"),
    ]
    for body, field in cases:
        status, answer = await post_job(stack, stack.a, body, "edge")
        assert status == 422, (body, answer)
        assert answer["detail"][0]["loc"][-1] == field, (body, answer)
    async with stack.http.post(
        url, data=b"not json", headers={**auth("alice"), "Content-Type": "application/json"}
    ) as r:
        assert r.status == 422
    statuses = []
    for _ in range(4):
        async with stack.http.get(f"{stack.a.url}/v1/jobs/gw-x", headers=auth("slow")) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
    assert statuses[:2] == [404, 404] and 429 in statuses[2:], statuses


async def test_a_chunked_body_over_the_limit_is_a_counted_413(stack: Stack) -> None:
    """No Content-Length to refuse it by: the 413 comes as the body is read (not FastAPI's 400
    for an error while it reads one), and /metrics counts it."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    async with stack.http.post(
        f"{stack.b.url}/v1/jobs",
        data=chunks(),
        headers={**auth("edge"), "Content-Type": "application/json"},
    ) as r:
        assert r.status == 413, await r.text()
    async with stack.http.get(f"{stack.b.url}/metrics") as r:
        assert 'method="POST",route="/v1/jobs",status="413"' in await r.text()


async def test_prefer_wait_as_rfc_7240_spells_it_and_bounded(stack: Stack) -> None:
    """Any case, spaces around "=", a quoted value; a wait past `max_prefer_wait_s` is applied,
    and said applied, as that bound."""
    for prefer, applied in (
        ("wait=99999999", "wait=60"),
        ('respond-async, WAIT = "30"', "wait=30"),
    ):
        async with stack.http.post(
            f"{stack.a.url}/v1/jobs",
            json={"prompt": "p", "steps": 2},
            headers={**auth("edge"), "Prefer": prefer},
        ) as r:
            job = await r.json()
            assert r.status == 200 and job["status"] == "succeeded", (prefer, job)
            assert r.headers["Preference-Applied"] == applied, prefer


async def test_one_idempotency_key_sent_at_once_makes_one_job(stack: Stack) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    answers = await asyncio.gather(
        *[
            post_job(
                stack, stack.a, {"prompt": "once", "steps": 2}, "edge", **{"Idempotency-Key": key}
            )
            for _ in range(5)
        ]
    )
    assert len({job["id"] for _, job in answers}) == 1, answers
    assert sorted(status for status, _ in answers) == [200, 200, 200, 200, 202]


async def test_a_last_event_id_not_sent_by_the_stream_replays_it(stack: Stack) -> None:
    """Raw requests, for the byte 0xB2 ("²" in latin-1: a digit to str.isdigit, not to int):
    the whole stream again, never a 500."""
    status, job = await post_job(stack, stack.a, {"prompt": "resume", "steps": 2}, "edge")
    assert status == 202, job
    for last in (b"\xb2", b"abc", b"-1"):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.b.port)
        writer.write(
            b"GET /v1/jobs/" + job["id"].encode() + b"/events HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + KEYS["edge"].encode() + b"\r\n"
            b"Last-Event-ID: " + last + b"\r\nConnection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b"\nid: 1\n" in answer and b"event: outcome" in answer, answer[:300]
    assert "Traceback" not in stack.b.output()
    # the outcome has an id too; reconnecting with it (an EventSource does, by itself, when
    # the stream ends) is a 204, which ends its reconnecting
    events = await read_events(
        stack.http, f"{stack.b.url}/v1/jobs/{job['id']}/events", auth("edge")
    )
    ids = [e[0] for e in events]
    assert events[-1][1] == "outcome" and ids == [str(i) for i in range(1, len(events) + 1)], ids
    async with stack.http.get(
        f"{stack.b.url}/v1/jobs/{job['id']}/events",
        headers={**auth("edge"), "Last-Event-ID": ids[-1]},
    ) as r:
        assert r.status == 204 and await r.read() == b""


async def test_webhook_signed_and_retried(stack: Stack) -> None:
    calls: list[tuple[bytes, str]] = []

    async def receiver(request: aiohttp.web.Request) -> aiohttp.web.Response:
        calls.append((await request.read(), request.headers.get(SIGNATURE_HEADER, "")))
        return aiohttp.web.Response(status=500 if len(calls) == 1 else 204)

    app = aiohttp.web.Application()
    app.router.add_post("/hook", receiver)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        status, job = await post_job(
            stack,
            stack.a,
            {"prompt": "hooked", "steps": 2, "webhook": f"http://127.0.0.1:{port}/hook"},
        )
        assert status == 202, job
        deadline = time.monotonic() + 60
        while len(calls) < 2:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert len(calls) == 2  # retried once after the 500, then delivered
        for body, signature in calls:
            assert verify(WEBHOOK_SECRET.encode(), body, signature, time.time())
            assert json.loads(body)["id"] == job["id"]
            assert json.loads(body)["status"] == "succeeded"
        assert not verify(b"wrong", calls[1][0], calls[1][1], time.time())
    finally:
        await runner.cleanup()


async def test_restarted_replica_serves_a_job_taken_before(stack: Stack) -> None:
    status, job = await post_job(
        stack, stack.a, {"prompt": "restart", "steps": 40, "scheduler": "euler"}
    )
    assert status == 202
    stack.b.stop()
    stack.b.start()
    await stack.b.ready()
    events = await read_events(
        stack.http, f"{stack.b.url}/v1/jobs/{job['id']}/events", auth("alice")
    )
    assert events[-1][2]["status"] == "succeeded"
    assert [e for e in events if e[1] == "progress"], "the restarted replica read the history"


async def test_ops_routes_and_playground(stack: Stack) -> None:
    status, _ = await post_job(stack, stack.a, {"prompt": "counted", "steps": 2})
    assert status == 202
    async with stack.http.get(f"{stack.a.url}/healthz") as r:
        assert r.status == 200
    async with stack.http.get(f"{stack.a.url}/metrics") as r:
        text = await r.text()
    assert 'gateway_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
    async with stack.http.get(f"{stack.a.url}/openapi.json") as r:
        doc = await r.json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/images/generations"} <= set(doc["paths"])
    async with stack.http.get(f"{stack.a.url}/docs") as r:
        assert r.status == 200
    async with stack.http.get(f"{stack.a.url}/") as r:
        page = await r.text()
    assert 'id="generate"' in page and "http://" not in page and "https://" not in page


async def test_kafka_down_is_503_with_retry_after(tmp_path: Path, kafka: Any, triton: Any) -> None:
    with TansuBroker(0) as broker:
        settings = make_settings(broker, triton)
        registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
        await create_topics(broker.bootstrap_servers, [*settings.service_topics(), registry])
        gw = Gateway(tmp_path, settings, registry, _keys_file(tmp_path / "keys.json"))
        gw.start()
        try:
            await gw.ready()
            broker.stop()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                async with http.post(
                    f"{gw.url}/v1/jobs", json={"prompt": "x", "steps": 2}, headers=auth("alice")
                ) as r:
                    assert r.status == 503, await r.text()
                    assert r.headers["Retry-After"] == "5"
                # a job this replica does not know may well be on the topics: not a 404
                for method, path in (
                    ("GET", "/v1/jobs/gw-unknown"),
                    ("GET", "/v1/jobs/gw-unknown/events"),
                    ("POST", "/v1/jobs/gw-unknown/cancel"),
                    ("GET", "/v1/images/gw-unknown/0.png"),
                ):
                    async with http.request(method, f"{gw.url}{path}", headers=auth("alice")) as r:
                        assert r.status == 503, (path, await r.text())
                        assert r.headers["Retry-After"] == "5"
                deadline = time.monotonic() + 30
                while True:
                    async with http.get(f"{gw.url}/readyz") as r:
                        if r.status == 503:
                            break
                    assert time.monotonic() < deadline, "readyz still 200 with Kafka down"
                    await asyncio.sleep(0.5)
        finally:
            gw.stop()


def _fuzz(base_url: str, doc: dict[str, Any], token: str, max_examples: int) -> list[str]:
    """Every operation of `doc`, valid and invalid inputs, against the running gateway; the
    5xx answers found (504 from the synchronous route, with the job's id, is its contract)."""
    import warnings

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    problems: list[str] = []
    schema = schemathesis.openapi.from_dict(doc)
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
                response = case.call(base_url=base_url, headers=headers, timeout=30)
                if response.status_code < 500:
                    return
                if response.status_code == 504 and case.path == "/v1/images/generations":
                    assert "id" in response.json()
                    return
                problems.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    run()
                except Unsatisfiable:
                    # no invalid input exists for an operation without a body whose
                    # parameters take any string (a job id) or that has none
                    assert mode is GenerationMode.NEGATIVE, operation.path
                    assert "requestBody" not in operation.definition.raw, operation.path
    return problems


async def test_openapi_fuzzing_finds_no_5xx(tmp_path: Path, kafka: Any, triton: Any) -> None:
    settings = make_settings(kafka, triton)
    registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka.bootstrap_servers, [*settings.service_topics(), registry])
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "id": "fuzz",
                        "sha256": hashlib.sha256(b"fuzz-key").hexdigest(),
                        "rate_per_s": 10_000,
                        "burst": 10_000,
                    }
                ]
            }
        )
    )
    gw = Gateway(tmp_path, settings, registry, keys)
    gw.env["ORCHESTRATOR_GATEWAY_SYNC_WAIT_S"] = "0.5"
    gw.env["ORCHESTRATOR_GATEWAY_CATCHUP_WAIT_S"] = "0.1"
    gw.start()
    try:
        await gw.ready()
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/openapi.json") as r:
            doc = await r.json()
        started = time.monotonic()
        problems = await asyncio.to_thread(_fuzz, gw.url, doc, "fuzz-key", 20)
        assert time.monotonic() - started < 60
        assert not problems, "\n".join(problems[:20])
        assert gw.process is not None and gw.process.poll() is None
        assert "Traceback" not in gw.output(), gw.output()[-3000:]
    finally:
        gw.stop()


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


async def test_playground_in_headless_chromium(stack: Stack, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{stack.a.url}/#key={KEYS['alice']}")
            assert await page.input_value("#key") == KEYS["alice"]
            assert "#key" not in page.url  # the fragment is wiped once read
            await page.fill("#prompt", "a lighthouse at dusk")
            await page.fill("#steps", "40")
            await page.click("#generate")
            seen: set[tuple[float, float]] = set()
            deadline = time.monotonic() + 120
            while True:
                value, top = await page.eval_on_selector("#bar", "b => [b.value, b.max]")
                seen.add((value, top))
                done = await page.evaluate(
                    "() => { const i = document.getElementById('image');"
                    " return !!i && i.complete && i.naturalWidth > 0; }"
                )
                if done:
                    break
                assert time.monotonic() < deadline, (seen, await page.inner_text("#status"))
                await asyncio.sleep(0.02)
            moving = {v for v, t in seen if 0 < v < t}
            assert moving, f"the progress bar never showed a step in between: {sorted(seen)}"
            assert (await page.inner_text("#status")).startswith("succeeded")
            assert not errors, errors
            shot = tmp_path / "playground.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes().startswith(PNG)
        finally:
            await browser.close()


async def test_docs_render_in_headless_chromium_with_no_other_host(stack: Stack) -> None:
    """/docs is Swagger UI from the gateway's own files: with every request to another host
    refused, the page still shows the API's operations."""
    from playwright.async_api import Route, async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            elsewhere: list[str] = []

            async def only_the_gateway(route: Route) -> None:
                if route.request.url.startswith(stack.a.url + "/"):
                    await route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    await route.abort()

            await page.route("**/*", only_the_gateway)
            await page.goto(f"{stack.a.url}/docs")
            await page.wait_for_selector(
                '.opblock-summary-path[data-path="/v1/jobs/{job_id}/events"]', timeout=30_000
            )
            assert "orchestrator gateway" in await page.inner_text(".swagger-ui .info")
            assert not elsewhere, elsewhere
        finally:
            await browser.close()


async def test_dev_runs_the_gateway_with_a_printed_key(tiny_models: Path, tmp_path: Path) -> None:
    from tests.integration.test_dev_stack import Dev, distinct_free_ports

    ports = distinct_free_ports()
    dev = Dev(tiny_models, tmp_path / "dev", ports)
    try:
        await asyncio.to_thread(dev.wait_ready)
        keys = [line for line in dev.lines if line.startswith("api key: ")]
        ready = next(i for i, line in enumerate(dev.lines) if line.startswith("ready"))
        assert keys and dev.lines.index(keys[0]) < ready, dev.output
        key = keys[0].removeprefix("api key: ")
        url = f"http://127.0.0.1:{ports['--gateway-port']}"
        assert any(line == f"playground: {url}/#key={key}" for line in dev.lines), dev.output
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            async with http.post(
                f"{url}/v1/jobs",
                json={"prompt": "dev", "steps": 2},
                headers={"Authorization": f"Bearer {key}", "Prefer": "wait=90"},
            ) as r:
                job = await r.json()
                assert r.status == 200 and job["status"] == "succeeded", job
            async with http.get(f"{url}/v1/jobs/{job['id']}") as r:
                assert r.status == 401
        dev.process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(dev.finish, 60) == 0, dev.output
        assert dev.lines[-1] == "stopped", dev.output
    finally:
        dev.close()
