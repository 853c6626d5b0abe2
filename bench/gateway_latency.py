"""The HTTP gateway's added latency over submitting to Kafka directly (issue 11).

Real Tansu, real tritonserver (micro preset), the real service and the real gateway as child
processes (`orchestrator serve`, `orchestrator gateway`), so this process holds only the clients.
The same requests (prompt, seed, steps) go three ways, and each is timed end to end on this
process's clock, from just before the first byte leaves until the image is known:

- `kafka`: `Client.generate`: produce to the request topic, wait for the answer on the response
  topic (the client's ReplyWatcher tail);
- `sync`: `POST /v1/images/generations` (response_format url) until its 200;
- `events`: `POST /v1/jobs`, then `GET /v1/jobs/{id}/events` until the `outcome` event.

At concurrency C, C workers run closed loops; worker i's k-th request takes path (i + k) mod 3, so
the three paths are interleaved over the same seconds of the same service and share its load and
this noisy machine's. Target: gateway p50 - kafka p50 <= 5 ms.

    .venv/bin/python bench/gateway_latency.py [--concurrency 1,32] [--requests 60] [--steps 4]

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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator.adapters.child_process import free_port, spawn, stop_process_group
from orchestrator.adapters.kafka import KafkaProducerAdapter
from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.client import Client
from orchestrator.config import Settings, load_settings
from orchestrator.domain import GenerationRequest
from orchestrator.models.build import ensure_preset

PATHS = ("kafka", "sync", "events")
KEY = "bench-gateway-key"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


class Paths:
    def __init__(self, client: Client, http: aiohttp.ClientSession, url: str, steps: int) -> None:
        self.client, self.http, self.url, self.steps = client, http, url, steps
        self.auth = {"Authorization": f"Bearer {KEY}"}

    def body(self, n: int) -> dict[str, Any]:
        return {"prompt": f"a lighthouse, study {n % 7}", "seed": n, "steps": self.steps}

    async def run(self, path: str, n: int) -> float:
        body = self.body(n)
        start = time.perf_counter()
        if path == "kafka":
            req = GenerationRequest(
                prompt=body["prompt"], seed=n, steps=self.steps, request_id=uuid.uuid4().hex
            )
            answer = await self.client.generate(req, 300)
            if not answer.ok:
                raise RuntimeError(f"kafka: {answer.reason}")
        elif path == "sync":
            async with self.http.post(
                f"{self.url}/v1/images/generations", json=body, headers=self.auth
            ) as r:
                text = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"sync: HTTP {r.status} {text[:200]!r}")
        else:
            async with self.http.post(f"{self.url}/v1/jobs", json=body, headers=self.auth) as r:
                job = await r.json()
                if r.status != 202:
                    raise RuntimeError(f"events: POST HTTP {r.status} {job}")
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
        return time.perf_counter() - start


async def measure(paths: Paths, concurrency: int, per_worker: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {p: [] for p in PATHS}
    counter = iter(range(10**9))

    async def worker(i: int) -> None:
        for k in range(per_worker):
            path = PATHS[(i + k) % len(PATHS)]
            got[path].append(await paths.run(path, next(counter)))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return got


def report(concurrency: int, got: dict[str, list[float]]) -> str:
    ms = {p: [x * 1000 for x in v] for p, v in got.items()}
    base50, base95 = statistics.median(ms["kafka"]), pct(ms["kafka"], 0.95)
    lines = [
        f"concurrency {concurrency}: {sum(len(v) for v in ms.values())} requests",
        f"  {'path':8s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s} {'added p50':>10s} "
        f"{'added p95':>10s}",
    ]
    for p in PATHS:
        p50, p95 = statistics.median(ms[p]), pct(ms[p], 0.95)
        added = "" if p == "kafka" else f"{p50 - base50:10.1f} {p95 - base95:10.1f}"
        lines.append(f"  {p:8s} {len(ms[p]):4d} {p50:9.1f} {p95:9.1f} {added}")
    worst = max(statistics.median(ms[p]) - base50 for p in ("sync", "events"))
    lines.append(
        f"  target: gateway p50 - kafka p50 <= 5 ms: {'MET' if worst <= 5 else 'MISSED'} "
        f"(worst {worst:.1f} ms)"
    )
    return "\n".join(lines)


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
    }
    py = [sys.executable, "-m", "orchestrator"]
    service = child([*py, "serve"], env, work / "service.log")
    gateway_py = py
    if args.profile:  # cProfile writes its file when the gateway exits (on SIGINT, below)
        gateway_py = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "orchestrator"]
    gateway_cmd = [*gateway_py, "gateway", "--port", str(port)]
    gateway = child(gateway_cmd, gateway_env, work / "gateway.log")
    client = Client.from_settings(settings)
    try:
        await client.start()
        await wait_http_ready(url, gateway, work / "gateway.log")
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            paths = Paths(client, http, url, args.steps)
            await measure(paths, 3, 3)  # warm-up: every path, the service's first calls
            print(
                f"\ngateway overhead, micro preset, {args.steps}-step requests, "
                f"{platform.machine()} {os.cpu_count()} cores, load "
                f"{os.getloadavg()[0]:.1f} at start"
            )
            for c in (int(x) for x in args.concurrency.split(",")):
                per_worker = max(3, (3 * args.requests) // c)
                cpu0 = cpu_s(gateway.pid), cpu_s(service.pid)
                got = await measure(paths, c, per_worker)
                cpu1 = cpu_s(gateway.pid), cpu_s(service.pid)
                print(report(c, got), flush=True)
                jobs = sum(len(v) for v in got.values())
                print(
                    f"  CPU per job: gateway {(cpu1[0] - cpu0[0]) / jobs * 1000:.1f} ms "
                    f"(its jobs are 2/3 of them), service "
                    f"{(cpu1[1] - cpu0[1]) / jobs * 1000:.1f} ms",
                    flush=True,
                )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=60, help="about this many per path")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models-dir", default="build/bench/micro")
    parser.add_argument("--profile", help="run the gateway under cProfile, stats to this file")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
