"""The HTTP gateway's added latency over submitting to Kafka directly (issue 11).

Real Tansu, real tritonserver (micro preset), the real service and the real gateway as child
processes (`orchestrator serve`, `orchestrator gateway`), so this process holds only the clients.
The same requests (prompt, seed, steps) go three ways, and each is timed end to end on this
process's clock, from just before the first byte leaves until the image is known:

- `kafka`: `Client.generate`: produce to the request topic, wait for the answer on the response
  topic (the client's ReplyWatcher tail);
- `sync`: `POST /v1/images/generations` (response_format url) until its 200;
- `events`: `POST /v1/jobs`, then `GET /v1/jobs/{id}/events` until the `outcome` event.

Each request is also split at the service: an observer reads the request and response topics
and takes each record's CreateTime, so `outside` = (request record's time - start) + (end -
answer record's time) is the path's own latency with the service's time (queueing, models)
taken out. Its spread is a fraction of the end-to-end one, so it resolves milliseconds where
end-to-end p50s, which carry the service's jitter, do not (the clocks are one machine's).

For the gateway paths the observer also reads the job registry: a registration's `created_ms` is
when the gateway's handler began `Gateway.submit`, which splits their `in` part into the start
to the handler (HTTP, the gateway's event loop, FastAPI's validation) and the handler to the
appended request record.

The HTTP paths' client (`--http-client`) is by default a lean HTTP/1.1 keep-alive connection per
worker that writes each request in the worker's own step, as the Kafka client appends its record
in its own: aiohttp (`--http-client aiohttp`, this bench's client before) writes a request from a
task of its own on Python 3.11, so at concurrency 32 each request waited for that task's turn on
this process's event loop, and that wait counted as the gateway's. `aiohttp,lean` measures both,
one after the other, at each concurrency. Each point also gives this process's CPU share and how
late its event loop ran a 5 ms timer (p50 / p95).

At concurrency C, C workers run closed loops; worker i's k-th request takes path (i + k) mod 3, so
the three paths are interleaved over the same seconds of the same service and share its load and
this noisy machine's. Target: gateway p50 - kafka p50 <= 5 ms.

    .venv/bin/python bench/gateway_latency.py [--concurrency 1,32] [--requests 60] [--steps 4]
        [--http-client lean|aiohttp|aiohttp,lean] [--client-linger-ms 0] [--gateway-nice N]
        [--gateway-env ORCHESTRATOR_GATEWAY_X=V ...] [--gateway-workers N]

`--gateway-nice -10` runs the gateway ahead of other processes for the CPU, as a gateway on
cores of its own would be: what it takes off the added latency is time spent waiting for a core.
`--gateway-env` sets one of the gateway's settings (repeatable), e.g. `..._LOOP=asyncio
..._HTTP=h11` for the gateway as it ran before uvloop and httptools, to compare variants in
runs one after the other. `--gateway-workers 2` runs `orchestrator gateway --workers 2` (its
CPU and handler times are then summed over the workers; `--gateway-nice` reaches only the first
process, the supervisor). Like for like: the gateway's tail and the Kafka client's reply tail
both wait 20 ms per fetch (their defaults), and the Kafka path's producer does not linger
(`--client-linger-ms 0`, as the gateway's; the Client's default of 5 ms costs that path about
6 ms per request here). Each added p50 comes with a 95 % bootstrap interval (the paths'
samples resampled 2000 times): a figure whose interval spans the target is not a verdict.

`--requests` is per path at concurrency 1; at concurrency C each worker makes
max(3, 3 * requests / C) requests, so every path gets about `requests` samples too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httptools

from orchestrator.adapters.child_process import (
    cpu_seconds,
    free_port,
    process_tree,
    spawn,
    stop_process_group,
)
from orchestrator.adapters.kafka import CORRELATION_ID_HEADER, KafkaProducerAdapter, header_str
from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.client import Client, tail
from orchestrator.config import Settings, load_settings
from orchestrator.domain import GenerationRequest
from orchestrator.gateway.jobs import Registration
from orchestrator.models.build import ensure_preset

PATHS = ("kafka", "sync", "events")

#: one request: (end-to-end seconds, request id, wall-clock start and end in ms)
Sample = tuple[float, str, float, float]
KEY = "bench-gateway-key"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds so far of a process; `children`: plus its descendants alive
    now (a gateway's workers)."""
    return cpu_seconds(process_tree(pid) if children else {pid})


def child(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return spawn(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)


async def wait_http_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready:\n{log.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.1)


class Lean(asyncio.Protocol):
    """A lean HTTP/1.1 keep-alive connection, one request at a time: the request's bytes are
    written in the caller's own step (as the Kafka client appends its record), and the response
    is parsed by httptools as it comes. aiohttp, on Python 3.11, writes a request's headers and
    body from a task of its own, so each request's first byte waits for that task's turn behind
    everything else ready on this process's event loop: at concurrency 32 that queueing counted
    as the gateway's."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.body = bytearray()
        self._parser = httptools.HttpResponseParser(self)
        self._changed: asyncio.Future[None] | None = None
        self.complete = True
        self.error: BaseException | None = None

    async def connect(self) -> None:
        if self.transport is None or self.transport.is_closing():
            loop = asyncio.get_running_loop()
            await loop.create_connection(lambda: self, self.host, self.port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.error = transport, None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.complete:
            self.error = exc or ConnectionError("connection closed mid-response")
            self._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = exc
            self._wake()

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body += body
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def send(self, method: str, target: str, auth: str, body: bytes = b"") -> None:
        """Write the request now (after `connect`, with the last response complete)."""
        assert self.transport is not None and self.complete
        self.status, self.body, self.complete = 0, bytearray(), False
        self._parser = httptools.HttpResponseParser(self)
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: {auth}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)

    async def until(self, done: Callable[[], bool]) -> None:
        """Until `done()` holds (checked on each piece of the response) or the response ends."""
        while not done() and not self.complete:
            if self.error is not None:
                raise self.error
            self._changed = asyncio.get_running_loop().create_future()
            await self._changed
        if not done() and self.error is not None:
            raise self.error


def outcome_of(stream: bytes | bytearray) -> str | None:
    """The status in an events stream's `outcome` event, once it has come whole."""
    at = stream.find(b"event: outcome\ndata: ")
    if at < 0:
        return None
    end = stream.find(b"\n\n", at)
    if end < 0:
        return None
    return str(json.loads(stream[at + 21 : end])["status"])


class Paths:
    def __init__(
        self, client: Client, http: aiohttp.ClientSession, url: str, steps: int, lean: bool
    ) -> None:
        self.client, self.http, self.url, self.steps, self.lean = client, http, url, steps, lean
        self.auth = {"Authorization": f"Bearer {KEY}"}
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        #: each worker's own keep-alive connection (lean client)
        self.connections: dict[int, Lean] = {}

    def body(self, n: int) -> dict[str, Any]:
        return {"prompt": f"a lighthouse, study {n % 7}", "seed": n, "steps": self.steps}

    async def run(self, path: str, n: int, worker: int = 0) -> Sample:
        body = self.body(n)
        conn = None
        if self.lean and path != "kafka":
            conn = self.connections.setdefault(worker, Lean(self.host, self.port))
            await conn.connect()  # before the clock starts: a kept-alive one is already open
        wall = time.time() * 1000
        start = time.perf_counter()
        if path == "kafka":
            rid = uuid.uuid4().hex
            req = GenerationRequest(prompt=body["prompt"], seed=n, steps=self.steps, request_id=rid)
            answer = await self.client.generate(req, 300)
            if not answer.ok:
                raise RuntimeError(f"kafka: {answer.reason}")
        elif conn is not None:
            rid = await self._lean(conn, path, json.dumps(body).encode())
        elif path == "sync":
            async with self.http.post(
                f"{self.url}/v1/images/generations", json=body, headers=self.auth
            ) as r:
                text = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"sync: HTTP {r.status} {text[:200]!r}")
            rid = json.loads(text)["id"]
        else:
            async with self.http.post(f"{self.url}/v1/jobs", json=body, headers=self.auth) as r:
                job = await r.json()
                if r.status != 202:
                    raise RuntimeError(f"events: POST HTTP {r.status} {job}")
            rid = job["id"]
            async with self.http.get(
                f"{self.url}/v1/jobs/{job['id']}/events", headers=self.auth
            ) as r:
                event = ""
                async for raw in r.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "outcome":
                        status = json.loads(line[6:])["status"]
                        if status != "succeeded":
                            raise RuntimeError(f"events: job {status}")
                        break
                else:
                    raise RuntimeError("events: stream ended without an outcome")
        elapsed = time.perf_counter() - start
        if conn is not None:
            await conn.until(lambda: False)  # the rest of the response, off the clock
        return elapsed, rid, wall, wall + elapsed * 1000

    async def _lean(self, conn: Lean, path: str, body: bytes) -> str:
        auth = self.auth["Authorization"]
        if path == "sync":
            conn.send("POST", "/v1/images/generations", auth, body)
            await conn.until(lambda: False)
            if conn.status != 200:
                raise RuntimeError(f"sync: HTTP {conn.status} {bytes(conn.body[:200])!r}")
            return str(json.loads(conn.body)["id"])
        conn.send("POST", "/v1/jobs", auth, body)
        await conn.until(lambda: False)
        if conn.status != 202:
            raise RuntimeError(f"events: POST HTTP {conn.status} {bytes(conn.body[:200])!r}")
        job_id = str(json.loads(conn.body)["id"])
        conn.send("GET", f"/v1/jobs/{job_id}/events", auth)
        await conn.until(lambda: outcome_of(conn.body) is not None)
        status = outcome_of(conn.body)
        if status is None:
            raise RuntimeError(f"events: stream ended without an outcome (HTTP {conn.status})")
        if status != "succeeded":
            raise RuntimeError(f"events: job {status}")
        return job_id


class Observer:
    """Tails the request and response topics and keeps each record's CreateTime (ms) by request
    id: when the request left its producer, and when the service produced the answer."""

    def __init__(self, settings: Settings, registry_topic: str) -> None:
        self.settings = settings
        self.registry_topic = registry_topic
        self.sent: dict[str, int] = {}
        self.answered: dict[str, int] = {}
        #: a gateway job's registration: when its handler began `Gateway.submit` (created_ms)
        self.handled: dict[str, int] = {}
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        topics = [self.settings.request_topic, self.settings.response_topic, self.registry_topic]
        self._consumer, _ = await tail(self.settings.kafka("-observer"), topics)
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    if tp.topic == self.settings.request_topic:
                        self.sent[bytes(record.key).decode()] = record.timestamp
                    elif tp.topic == self.registry_topic:
                        reg = Registration.decode(bytes(record.value))
                        self.handled[reg.job_id] = reg.created_ms
                    else:
                        headers = [(k, bytes(v)) for k, v in record.headers or () if v is not None]
                        rid = header_str(headers, CORRELATION_ID_HEADER)
                        if rid is not None:
                            self.answered[rid] = record.timestamp

    async def split(self, samples: list[Sample]) -> list[tuple[float, float]]:
        """(in, out) ms of each sample the observer has both records of: from its start to its
        request record, and from its answer record to its end."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(
            s[1] in self.sent and s[1] in self.answered for s in samples
        ):
            await asyncio.sleep(0.1)
        return [
            (self.sent[rid] - start, end - self.answered[rid])
            for _, rid, start, end in samples
            if rid in self.sent and rid in self.answered
        ]

    def split_in(self, samples: list[Sample]) -> list[tuple[float, float]]:
        """A gateway path's `in` part in two: (from its start to its handler's `submit`, from
        there to its request record), ms."""
        return [
            (self.handled[rid] - start, self.sent[rid] - self.handled[rid])
            for _, rid, start, _ in samples
            if rid in self.handled and rid in self.sent
        ]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def measure(paths: Paths, concurrency: int, per_worker: int) -> dict[str, list[Sample]]:
    got: dict[str, list[Sample]] = {p: [] for p in PATHS}
    counter = iter(range(10**9))

    async def worker(i: int) -> None:
        for k in range(per_worker):
            path = PATHS[(i + k) % len(PATHS)]
            got[path].append(await paths.run(path, next(counter), i))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return got


def added_p50_interval(
    path: list[float], base: list[float], rounds: int = 2000
) -> tuple[float, float]:
    """95 % bootstrap interval of median(path) - median(base)."""
    rng = random.Random(0)
    diffs = sorted(
        statistics.median(rng.choices(path, k=len(path)))
        - statistics.median(rng.choices(base, k=len(base)))
        for _ in range(rounds)
    )
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]


async def handler_ms(
    http: aiohttp.ClientSession, url: str, workers: int = 1
) -> dict[str, tuple[float, float]]:
    """The gateway's own count and total seconds per POST route (its metrics: from the ASGI
    call to the response's start), to tell its handlers' time from the time before them; summed
    over its `workers` processes (each scrape on a new connection, until each worker answered)."""
    texts: dict[str, str] = {}
    for _ in range(20 * workers):
        async with http.get(f"{url}/metrics", headers={"Connection": "close"}) as r:
            texts[r.headers.get("X-Gateway-Replica", "")] = await r.text()
        if len(texts) >= workers:
            break
    out: dict[str, tuple[float, float]] = {}
    for replica, text in texts.items():  # each worker's POSTs, under its replica id
        posts = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_http_request_seconds_count") and 'method="POST"' in line
        )
        out[f"replica {replica}"] = (posts, 0.0)
    for line in "\n".join(texts.values()).splitlines():
        if line.startswith("gateway_http_request_seconds_") and 'method="POST"' in line:
            name, value = line.rsplit(" ", 1)
            route = name.split('route="', 1)[1].split('"', 1)[0]
            n, total = out.get(route, (0.0, 0.0))
            if name.startswith("gateway_http_request_seconds_count"):
                out[route] = (n + float(value), total)
            elif name.startswith("gateway_http_request_seconds_sum"):
                out[route] = (n, total + float(value))
    return out


def report(concurrency: int, ms: dict[str, list[float]], what: str) -> str:
    base50, base95 = statistics.median(ms["kafka"]), pct(ms["kafka"], 0.95)
    lines = [
        f"concurrency {concurrency}, {what}: {sum(len(v) for v in ms.values())} requests",
        f"  {'path':8s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s} {'added p50':>10s} "
        f"{'95% interval':>17s} {'added p95':>10s}",
    ]
    verdicts = []
    for p in PATHS:
        p50, p95 = statistics.median(ms[p]), pct(ms[p], 0.95)
        added = ""
        if p != "kafka":
            lo, hi = added_p50_interval(ms[p], ms["kafka"])
            verdicts.append("MET" if hi <= 5 else "MISSED" if lo > 5 else "UNDECIDED")
            added = f"{p50 - base50:10.1f} {f'[{lo:.1f}, {hi:.1f}]':>17s} {p95 - base95:10.1f}"
        lines.append(f"  {p:8s} {len(ms[p]):4d} {p50:9.1f} {p95:9.1f} {added}")
    worst = max(statistics.median(ms[p]) - base50 for p in ("sync", "events"))
    verdict = next((v for v in ("MISSED", "UNDECIDED") if v in verdicts), "MET")
    lines.append(
        f"  target: gateway p50 - kafka p50 <= 5 ms: {verdict} (worst {worst:.1f} ms; MET/MISSED "
        f"only where the 95 % interval is all below/above 5 ms)"
    )
    return "\n".join(lines)


async def loop_lag(lags: list[float], period_s: float = 0.005) -> None:
    """How late this process's event loop runs a timer (ms): the queue of ready callbacks
    every client step here waits behind."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        lags.append((loop.time() - t0 - period_s) * 1000)


async def point(
    paths: Paths,
    c: int,
    requests: int,
    observer: Observer,
    http: aiohttp.ClientSession,
    url: str,
    gateway: subprocess.Popen[bytes],
    service: subprocess.Popen[bytes],
    workers: int = 1,
) -> None:
    per_worker = max(3, (3 * requests) // c)
    cpu0 = cpu_s(gateway.pid, True), cpu_s(service.pid), cpu_s(os.getpid())
    handled0 = await handler_ms(http, url, workers)
    lags: list[float] = []
    lag_task = asyncio.create_task(loop_lag(lags))
    t0 = time.perf_counter()
    got = await measure(paths, c, per_worker)
    wall = time.perf_counter() - t0
    lag_task.cancel()
    cpu1 = cpu_s(gateway.pid, True), cpu_s(service.pid), cpu_s(os.getpid())
    handled1 = await handler_ms(http, url, workers)
    print(report(c, {p: [x[0] * 1000 for x in v] for p, v in got.items()}, "end to end"))
    split = {p: await observer.split(v) for p, v in got.items()}
    outside = {p: [a + b for a, b in v] for p, v in split.items()}
    print(report(c, outside, "outside the service"), flush=True)
    print(
        "  p50 in / out of the service: "
        + ", ".join(
            f"{p} {statistics.median(a for a, _ in v):.1f} / "
            f"{statistics.median(b for _, b in v):.1f} ms"
            for p, v in split.items()
        ),
        flush=True,
    )
    parts = {p: observer.split_in(got[p]) for p in ("sync", "events")}
    print(
        "  p50 of `in`, start -> handler's submit / submit -> request record: "
        + ", ".join(
            f"{p} {statistics.median(a for a, _ in v):.1f} / "
            f"{statistics.median(b for _, b in v):.1f} ms"
            for p, v in parts.items()
            if v
        )
    )
    means, shares = [], []
    for route, (n1, s1) in handled1.items():
        n0, s0 = handled0.get(route, (0.0, 0.0))
        if route.startswith("replica "):
            shares.append(f"{n1 - n0:.0f}")
        elif n1 > n0:
            means.append(f"{route} {(s1 - s0) / (n1 - n0) * 1000:.1f} ms")
    print(f"  gateway's mean time in its POST handlers: {', '.join(means)}")
    if len(shares) > 1:
        print(f"  POSTs per worker: {' / '.join(shares)}")
    jobs = sum(len(v) for v in got.values())
    print(
        f"  CPU per job: gateway {(cpu1[0] - cpu0[0]) / jobs * 1000:.1f} ms "
        f"(its jobs are 2/3 of them), service {(cpu1[1] - cpu0[1]) / jobs * 1000:.1f} ms; "
        f"this process {(cpu1[2] - cpu0[2]) / wall * 100:.0f} % of a core, its event loop "
        f"late by p50 {statistics.median(lags):.1f} / p95 {pct(lags, 0.95):.1f} ms",
        flush=True,
    )


async def run(broker: TansuBroker, triton: TritonServer, args: argparse.Namespace) -> int:
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    settings: Settings = load_settings(
        None,
        bootstrap_servers=broker.bootstrap_servers,
        triton_url=triton.grpc_url,
        request_topic=f"req-{tag}",
        response_topic=f"resp-{tag}",
        dlq_topic=f"dlq-{tag}",
        progress_topic=f"progress-{tag}",
        control_topic=f"control-{tag}",
        group_id=f"g-{tag}",
        http_port=0,
        tracing=False,
        output_dir=work / "images",
    )
    registry = f"gwjobs-{tag}"
    await create_topics(broker.bootstrap_servers, settings.service_topics(), partitions=2)
    await create_topics(broker.bootstrap_servers, [registry], partitions=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(
        {
            "ORCHESTRATOR_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "ORCHESTRATOR_TRITON_URL": settings.triton_url,
            "ORCHESTRATOR_REQUEST_TOPIC": settings.request_topic,
            "ORCHESTRATOR_RESPONSE_TOPIC": settings.response_topic,
            "ORCHESTRATOR_DLQ_TOPIC": settings.dlq_topic,
            "ORCHESTRATOR_PROGRESS_TOPIC": settings.progress_topic,
            "ORCHESTRATOR_CONTROL_TOPIC": settings.control_topic,
            "ORCHESTRATOR_GROUP_ID": settings.group_id,
            "ORCHESTRATOR_OUTPUT_DIR": str(settings.output_dir),
            "ORCHESTRATOR_TRACING": "false",
            "ORCHESTRATOR_HTTP_PORT": "0",
        }
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway_env = {
        **env,
        "ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC": registry,
        "ORCHESTRATOR_GATEWAY_DEV_KEY": KEY,
        "ORCHESTRATOR_GATEWAY_RATE_PER_S": "10000",
        "ORCHESTRATOR_GATEWAY_BURST": "100000",
        "ORCHESTRATOR_GATEWAY_MAX_CONCURRENT": "1000",
        "ORCHESTRATOR_GATEWAY_SYNC_WAIT_S": "300",
        **dict(kv.split("=", 1) for kv in args.gateway_env),
    }
    py = [sys.executable, "-m", "orchestrator"]
    service = child([*py, "serve"], env, work / "service.log")
    gateway_py = py
    if args.profile:  # cProfile writes its file when the gateway exits (on SIGINT, below)
        gateway_py = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "orchestrator"]
    gateway_cmd = [*gateway_py, "gateway", "--port", str(port)]
    if args.gateway_workers > 1:
        gateway_cmd += ["--workers", str(args.gateway_workers)]
    gateway = child(gateway_cmd, gateway_env, work / "gateway.log")
    if args.gateway_nice:  # set before it starts any thread, so all of its threads have it
        os.setpriority(os.PRIO_PROCESS, gateway.pid, args.gateway_nice)
    client = Client.from_settings(settings)
    observer = Observer(settings, registry)
    # the Kafka path's producer as the gateway's (linger 0 unless asked otherwise)
    client.producer = KafkaProducerAdapter(
        settings.kafka("-client"), linger_ms=args.client_linger_ms
    )
    try:
        await client.start()
        await observer.start()
        await wait_http_ready(url, gateway, work / "gateway.log")
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            clients = args.http_client.split(",")
            for kind in clients:  # warm-up: every path, the service's first calls
                await measure(Paths(client, http, url, args.steps, kind == "lean"), 3, 3)
            print(
                f"\ngateway overhead, micro preset, {args.steps}-step requests, "
                f"{platform.machine()} {os.cpu_count()} cores, load "
                f"{os.getloadavg()[0]:.1f} at start"
                + (f"; gateway {' '.join(args.gateway_env)}" if args.gateway_env else "")
                + f"; Kafka path linger {args.client_linger_ms} ms"
                + (f"; gateway nice {args.gateway_nice}" if args.gateway_nice else "")
                + f"; gateway workers {args.gateway_workers}"
            )
            for c in (int(x) for x in args.concurrency.split(",")):
                for kind in clients:
                    paths = Paths(client, http, url, args.steps, kind == "lean")
                    print(f"-- HTTP client: {kind}, load {os.getloadavg()[0]:.1f}", flush=True)
                    await point(
                        paths,
                        c,
                        args.requests,
                        observer,
                        http,
                        url,
                        gateway,
                        service,
                        args.gateway_workers,
                    )
                    for conn in paths.connections.values():
                        if conn.transport is not None:
                            conn.transport.close()
            # one produce acknowledgement (linger 0, as the gateway's producer): the gateway
            # waits for two in a row (job registry, then the request), the client for one
            await create_topics(broker.bootstrap_servers, [f"scratch-{tag}"], partitions=1)
            producer = KafkaProducerAdapter(settings.kafka("-bench"), linger_ms=0)
            await producer.start()
            try:
                acks = []
                for _ in range(60):
                    t0 = time.perf_counter()
                    await producer.publish(f"scratch-{tag}", b"x" * 200, key=b"k")
                    acks.append((time.perf_counter() - t0) * 1000)
            finally:
                await producer.stop()
            print(
                f"one produce ack (linger 0): p50 {statistics.median(acks):.1f} ms, "
                f"p95 {pct(acks, 0.95):.1f} ms"
            )
            print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        await observer.stop()
        await client.stop()
        # uvicorn re-raises the signal it caught; SIGINT lets cProfile write its file first
        stop_sig = signal.SIGINT if args.profile else signal.SIGTERM
        stop_process_group(gateway, timeout=10, sig=stop_sig)
        stop_process_group(service, timeout=20)
    shutil.rmtree(work, ignore_errors=True)  # kept (with the children's logs) after a failure
    return 0


async def main_async(args: argparse.Namespace) -> int:
    cache = Path(args.models_dir)
    ensure_preset("micro", cache)
    broker = TansuBroker(0)
    broker.start()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-triton-"))
    triton = TritonServer(cache / "repository", work_dir=work)
    try:
        broker.wait_ready(30)
        triton.start()
        triton.wait_ready(180)
        return await run(broker, triton, args)
    finally:
        triton.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _gateway_env(text: str) -> str:
    name, sep, _ = text.partition("=")
    if not sep or not name.startswith("ORCHESTRATOR_GATEWAY_"):
        raise argparse.ArgumentTypeError("expected ORCHESTRATOR_GATEWAY_NAME=VALUE")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=60, help="about this many per path")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models-dir", default="build/bench/micro")
    parser.add_argument("--profile", help="run the gateway under cProfile, stats to this file")
    parser.add_argument(
        "--client-linger-ms",
        type=int,
        default=0,
        help="the Kafka path's producer linger (0, as the gateway's; the Client's default is 5)",
    )
    parser.add_argument(
        "--http-client",
        default="lean",
        help="the HTTP paths' client: lean (requests written in the caller's step), aiohttp "
        "(as before: each request's bytes go out from a task of its own), or both, "
        "comma-separated, measured one after the other at each concurrency",
    )
    parser.add_argument(
        "--gateway-nice",
        type=int,
        default=0,
        help="the gateway's nice value (below 0 needs root): how much of its added latency is "
        "waiting for a core on a loaded machine",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="the gateway's worker processes (its --workers; CPU and handler times are summed "
        "over them)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        type=_gateway_env,
        metavar="ORCHESTRATOR_GATEWAY_NAME=VALUE",
        help="one of the gateway's settings for this run (repeatable)",
    )
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
