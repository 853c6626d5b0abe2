"""`orchestrator bench --architectures`: the seed's four ways to serve the pipeline, measured on
the same workload (issue 12).

Starts the real stack itself: Tansu, one tritonserver on the preset's generated repository, and
for each architecture its own processes, so this process holds only the clients:

- `bls`: pure Triton, one gRPC call per request to the `pipeline_bls` model (no Kafka);
- `hybrid`: `orchestrator serve` (role all) as a child process, driven over Kafka;
- `gateway`: the same service with `orchestrator gateway` in front, driven over HTTP
  (`POST /v1/images/generations`);
- `roles`: three child processes, `orchestrator serve --role encode|denoise|decode`, chained by
  the hand-off topics, driven over Kafka.

Workloads: `uniform` (one size, steps and scheduler) and `mixed` (three sizes, steps S/2, S,
3S/2, seven schedulers, every 4th request img2img at strength 0.75, every 5th unguided). Every
prompt is unique, so no architecture answers an encoding from a cache. The BLS model and the
gateway take no init image: they run a mixed workload's img2img requests as text-to-image
(counted as `as_txt2img`).

Per point (architecture, workload, concurrency, closed loop): throughput, end-to-end p50/p95/p99
on this process's clock, per-stage p50/p95 from the answers' `timings_ms` (for BLS, which reports
no timings of its own, the mean per request from Triton's per-model statistics), Kafka records
and bytes per request by topic (every record the broker took during the point, read back), and
the seed's p95 targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.bench import (
    CHARGED_MODELS,
    RpcTimer,
    Send,
    answer_sender,
    closed_loop,
    direct_sender,
    ensure_models,
    make_requests,
    percentiles,
    read_stats,
    stats_delta,
)
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER
from orchestrator.domain import GenerationRequest, ModelInfo

ARCHITECTURES = ("bls", "hybrid", "gateway", "roles")
ROLES = ("encode", "denoise", "decode")
#: (name, timings_ms key, the seed's p95 target in ms)
STAGES: tuple[tuple[str, str, float], ...] = (
    ("prompt", ENCODE_PROMPT, 1000.0),
    ("image", VAE_ENCODER, 500.0),
    ("sampling", UNET, 2000.0),
    ("decoding", VAE_DECODER, 500.0),
)
TOTAL_TARGET_MS = 5000.0
GATEWAY_KEY = "bench-architectures-key"
#: the records that carry a request's data from stage to stage (the rest: progress, registry)
DATA_TOPICS = ("requests", "encoded", "denoised", "responses")


@dataclasses.dataclass
class StageFigure:
    p50_ms: float | None
    p95_ms: float | None
    #: mean per request (BLS: the only figure Triton's statistics give)
    mean_ms: float | None
    samples: int
    #: "answers" (timings_ms of the answer records) or "triton-stats" (mean per request)
    source: str
    target_ms: float
    #: met / missed / n/a
    verdict: str


@dataclasses.dataclass
class PointResult:
    preset: str
    architecture: str
    workload: str
    concurrency: int
    requests: int
    failed: int
    #: img2img requests this architecture ran as text-to-image (it takes no init image)
    as_txt2img: int
    wall_s: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    total_target: str
    stages: dict[str, StageFigure]
    #: records per request on the topics that carry the request's data (request, hand-offs,
    #: answer)
    kafka_hops: float
    kafka_records_per_request: float
    kafka_bytes_per_request: float
    #: topic kind -> {records, bytes} per request
    kafka_by_topic: dict[str, dict[str, float]]


# -- workload --------------------------------------------------------------------------------


def mixed_sizes(info: ModelInfo) -> list[tuple[int, int]]:
    """The model's default size, half of it and a landscape of the two (multiples kept)."""
    m = info.size_multiple
    w, h = info.default_width, info.default_height
    hw, hh = max(m, w // 2 // m * m), max(m, h // 2 // m * m)
    return [(w, h), (hw, hh), (w, hh)]


def init_png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def workload_requests(
    workload: str, n: int, steps: int, info: ModelInfo, offset: int = 0
) -> list[GenerationRequest]:
    """`orchestrator bench`'s workloads with a unique prompt each; `mixed` adds sizes, img2img
    (every 4th) and unguided requests (every 5th) to its steps and schedulers."""
    out = []
    sizes = mixed_sizes(info)
    for k, r in enumerate(make_requests(workload, n, steps, offset)):
        i = k + offset
        r = dataclasses.replace(r, prompt=f"{r.prompt}, variant {i}")
        if workload == "mixed":
            w, h = sizes[i % len(sizes)]
            r = dataclasses.replace(r, width=w, height=h)
            if i % 5 == 4:
                r = dataclasses.replace(r, guidance_scale=1.0)
            if i % 4 == 3:
                # strength 0.75 of at least 2 steps: at least one step runs
                r = dataclasses.replace(
                    r, init_image=init_png(w, h, i), strength=0.75, steps=max(2, r.steps)
                )
        out.append(r)
    return out


# -- child processes -------------------------------------------------------------------------


class Children:
    """Child processes started with `spawn()` (a session of their own, killed if this process
    dies); `stop()` ends each group and reaps it, the front door first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> None:
        from orchestrator.adapters.child_process import spawn

        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as out:
            process = spawn(
                list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=dict(env)
            )
        self.running.append((name, process))

    def log_tail(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]

    def check(self) -> None:
        for name, process in self.running:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode}:\n{self.log_tail(name)}"
                )

    def stop(self) -> None:
        from orchestrator.adapters.child_process import stop_process_group

        while self.running:
            _, process = self.running.pop()
            stop_process_group(process, timeout=20)


def service_env(fields: Mapping[str, object]) -> dict[str, str]:
    """This process's environment without its ORCHESTRATOR_* variables, plus `fields` as the
    service's settings (ORCHESTRATOR_<FIELD>)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update({f"ORCHESTRATOR_{k.upper()}": str(v) for k, v in fields.items()})
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


async def wait_http_ready(url: str, children: Children, timeout: float = 180.0) -> None:
    """Poll `url` (a /readyz) until it answers 200, failing when a child exits."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            children.check()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready in {timeout:.0f} s")
            await asyncio.sleep(0.2)


# -- Kafka traffic ---------------------------------------------------------------------------


class KafkaTraffic:
    """Every record the broker takes, read back by a consumer (no group) that follows every
    topic from its first record: counts and bytes (key, value and headers) per topic, and the
    answer records' values. `drain()` returns what arrived since the last drain, once the topics
    have been quiet for `quiet_s`.

    Read back rather than counted from end offsets: Tansu's ListOffsets answered a batch of
    several records as one (the end offsets undercounted, then caught up a point later)."""

    def __init__(self, bootstrap: str, quiet_s: float = 0.6) -> None:
        self.bootstrap = bootstrap
        self.quiet_s = quiet_s
        self.consumer: Any = None
        self.positions: dict[Any, int] = {}

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=64 * 1024 * 1024,
        )
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def _follow_new_topics(self) -> None:
        from aiokafka import TopicPartition

        # the cluster's metadata as of now (what `consumer.topics()` fetches: the consumer's own
        # cached metadata would miss topics created since it started)
        cluster = await self.consumer._client.fetch_all_metadata()
        tps = {
            TopicPartition(t, p)
            for t in cluster.topics()
            if not t.startswith("__")
            for p in cluster.partitions_for_topic(t) or ()
        }
        if tps - set(self.positions):
            self.positions.update({tp: 0 for tp in tps - set(self.positions)})
            self.consumer.assign(sorted(self.positions))
            for tp, offset in self.positions.items():
                self.consumer.seek(tp, offset)

    async def drain(self) -> list[Any]:
        await self._follow_new_topics()
        records: list[Any] = []
        if not self.positions:
            return records
        quiet_until = time.monotonic() + self.quiet_s
        while time.monotonic() < quiet_until:
            batches = await self.consumer.getmany(timeout_ms=100)
            for tp, recs in batches.items():
                if recs:
                    records += recs
                    self.positions[tp] = recs[-1].offset + 1
                    quiet_until = time.monotonic() + self.quiet_s
        return records


def record_bytes(record: Any) -> int:
    key = max(0, record.serialized_key_size)
    value = max(0, record.serialized_value_size)
    headers = sum(len(k) + len(v or b"") for k, v in record.headers or ())
    return int(key + value + headers)


# -- figures ---------------------------------------------------------------------------------


def _verdict(value: float | None, target: float) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return "met" if value < target else "missed"


def stages_from_answers(timings: Sequence[Mapping[str, float]]) -> dict[str, StageFigure]:
    out = {}
    for name, key, target in STAGES:
        values = [t[key] for t in timings if key in t]
        p50: float | None = None
        p95: float | None = None
        mean: float | None = None
        if values:
            p50, p95, _ = percentiles(values)
            mean = float(np.mean(values))
        out[name] = StageFigure(
            p50, p95, mean, len(values), "answers", target, _verdict(p95, target)
        )
    return out


def stages_from_triton(delta: Mapping[str, Mapping[str, int]], ok: int) -> dict[str, StageFigure]:
    """BLS: Triton's compute + queue time per stage model, per request (a mean only). A mean over
    the target means the p95 is over it too (missed); under it says nothing of the p95 (n/a)."""
    out = {}
    for name, key, target in STAGES:
        ns = sum(
            delta.get(m, {}).get("compute_ns", 0) + delta.get(m, {}).get("queue_ns", 0)
            for m in CHARGED_MODELS[key]
        )
        calls = sum(delta.get(m, {}).get("requests", 0) for m in CHARGED_MODELS[key])
        mean = ns / 1e6 / ok if ok and calls else None
        verdict = "missed" if mean is not None and mean >= target else "n/a"
        out[name] = StageFigure(None, None, mean, calls, "triton-stats", target, verdict)
    return out


def traffic_figures(
    records: Sequence[Any], kinds: Mapping[str, str], n: int
) -> tuple[float, float, float, dict[str, dict[str, float]]]:
    """(hops, records, bytes) per request and the same by topic kind."""
    by: dict[str, dict[str, float]] = {}
    for r in records:
        into = by.setdefault(kinds.get(r.topic, r.topic), {"records": 0.0, "bytes": 0.0})
        into["records"] += 1
        into["bytes"] += record_bytes(r)
    per = 1.0 / n if n else 0.0
    by = {k: {m: v * per for m, v in d.items()} for k, d in sorted(by.items())}
    hops = sum(d["records"] for k, d in by.items() if k in DATA_TOPICS)
    return (
        hops,
        sum(d["records"] for d in by.values()),
        sum(d["bytes"] for d in by.values()),
        by,
    )


# -- architectures ---------------------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    bootstrap: str
    triton_grpc: str
    triton_http: str
    info: ModelInfo
    log_dir: Path
    timeout: float
    max_in_flight: int


@dataclasses.dataclass
class Driver:
    """How one architecture takes a request, and where its answers can be read back."""

    send: Send
    #: topic -> kind ("requests", "responses", ...); empty without Kafka
    topic_kinds: dict[str, str]
    response_topic: str | None
    codec: Any = None
    takes_init_image: bool = True


def _kafka_fields(stack: Stack, tag: str) -> dict[str, object]:
    """The service's settings for one architecture: topics and group of its own (the hand-off
    topics too, so nothing but this run's names is created on a broker that is not ours)."""
    return {
        "bootstrap_servers": stack.bootstrap,
        "triton_url": stack.triton_grpc,
        "request_topic": f"arch-req-{tag}",
        "response_topic": f"arch-resp-{tag}",
        "dlq_topic": f"arch-dlq-{tag}",
        "progress_topic": f"arch-progress-{tag}",
        "control_topic": f"arch-control-{tag}",
        "group_id": f"arch-{tag}",
        "max_in_flight": stack.max_in_flight,
        "triton_timeout_s": stack.timeout,
        "tracing": False,
        "output_dir": stack.log_dir / f"images-{tag}",
        "encoded_topic": f"arch-encoded-{tag}",
        "denoised_topic": f"arch-denoised-{tag}",
    }


@contextlib.asynccontextmanager
async def kafka_driver(stack: Stack, architecture: str) -> AsyncIterator[Driver]:
    """The service as child processes (`serve`, or one `serve --role` per stage), with the
    gateway in front for `gateway`."""
    import aiohttp

    from orchestrator.adapters.child_process import free_port
    from orchestrator.adapters.kafka_broker import create_topics
    from orchestrator.client import Client
    from orchestrator.config import load_settings

    split = architecture == "roles"
    tag = uuid.uuid4().hex[:8]
    fields = _kafka_fields(stack, tag)
    settings = load_settings(None, **fields)
    kinds = {
        settings.request_topic: "requests",
        settings.response_topic: "responses",
        settings.dlq_topic: "dlq",
        settings.progress_topic: "progress",
        settings.control_topic: "control",
        settings.encoded_topic: "encoded",
        settings.denoised_topic: "denoised",
    }
    registry = f"arch-gwjobs-{tag}"
    kinds[registry] = "gateway-registry"
    await create_topics(stack.bootstrap, [*settings.service_topics(), *kinds], partitions=2)
    children = Children(stack.log_dir / f"{architecture}-{tag}")
    py = [sys.executable, "-m", "orchestrator"]
    client = Client.from_settings(settings)
    try:
        ready_urls = []
        for role in ROLES if split else ("all",):
            port = free_port()
            role_args = ["--role", role] if split else []
            children.start(
                f"serve-{role}",
                [*py, "serve", *role_args],
                service_env({**fields, "http_port": port}),
            )
            ready_urls.append(f"http://127.0.0.1:{port}/readyz")
        gateway_url = ""
        if architecture == "gateway":
            port = free_port()
            gateway_env = service_env({**fields, "http_port": 0})
            gateway_env.update(
                {
                    "ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC": registry,
                    "ORCHESTRATOR_GATEWAY_DEV_KEY": GATEWAY_KEY,
                    "ORCHESTRATOR_GATEWAY_RATE_PER_S": "10000",
                    "ORCHESTRATOR_GATEWAY_BURST": "100000",
                    "ORCHESTRATOR_GATEWAY_MAX_CONCURRENT": "1000",
                    "ORCHESTRATOR_GATEWAY_SYNC_WAIT_S": str(stack.timeout),
                }
            )
            children.start("gateway", [*py, "gateway", "--port", str(port)], gateway_env)
            gateway_url = f"http://127.0.0.1:{port}"
            ready_urls.append(f"{gateway_url}/readyz")
        for url in ready_urls:
            await wait_http_ready(url, children)
        await client.start()
        if architecture != "gateway":
            yield Driver(
                answer_sender(client, stack.timeout), kinds, settings.response_topic, client.codec
            )
            return
        timeout = aiohttp.ClientTimeout(total=stack.timeout)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            auth = {"Authorization": f"Bearer {GATEWAY_KEY}"}

            async def send_http(r: GenerationRequest) -> None:
                body: dict[str, Any] = {
                    "prompt": r.prompt,
                    "negative_prompt": r.negative_prompt,
                    "seed": r.seed,
                    "steps": r.steps,
                    "scheduler": r.scheduler,
                    "guidance_scale": r.guidance_scale,
                    "response_format": "url",
                }
                if r.width and r.height:
                    body["size"] = f"{r.width}x{r.height}"
                async with http.post(
                    f"{gateway_url}/v1/images/generations", json=body, headers=auth
                ) as resp:
                    text = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"gateway: HTTP {resp.status} {text[:200]!r}")

            yield Driver(send_http, kinds, settings.response_topic, client.codec, False)
    finally:
        with contextlib.suppress(Exception):
            await client.stop()
        children.stop()


@contextlib.asynccontextmanager
async def driver_for(stack: Stack, architecture: str) -> AsyncIterator[Driver]:
    if architecture == "bls":
        async with direct_sender("bls", stack.triton_grpc, stack.timeout, RpcTimer()) as send:
            yield Driver(send, {}, None, None, False)
    elif architecture in ARCHITECTURES:
        async with kafka_driver(stack, architecture) as driver:
            yield driver
    else:
        raise ValueError(f"unknown architecture {architecture!r} (one of {ARCHITECTURES})")


async def measure_point(
    stack: Stack,
    driver: Driver,
    traffic: KafkaTraffic,
    *,
    preset: str,
    architecture: str,
    workload: str,
    concurrency: int,
    requests: Sequence[GenerationRequest],
) -> PointResult:
    await traffic.drain()  # what came before this point (warm-up, the last point's tail)
    stats_before = read_stats([stack.triton_http])
    latencies, failed, wall = await closed_loop(requests, concurrency, driver.send)
    delta = stats_delta(stats_before, read_stats([stack.triton_http]))
    records = await traffic.drain()  # until quiet: the progress events after the answers too
    ok = len(latencies)
    n = len(requests)
    if driver.response_topic is None:
        stages = stages_from_triton(delta, ok)
    else:
        timings = [
            driver.codec.decode_result(r.value).timings_ms
            for r in records
            if r.topic == driver.response_topic
        ]
        stages = stages_from_answers(timings)
    hops, recs, nbytes, by_topic = traffic_figures(records, driver.topic_kinds, n)
    p50, p95, p99 = percentiles([x * 1000.0 for x in latencies])
    return PointResult(
        preset=preset,
        architecture=architecture,
        workload=workload,
        concurrency=concurrency,
        requests=n,
        failed=failed,
        as_txt2img=0
        if driver.takes_init_image
        else sum(1 for r in requests if r.init_image is not None),
        wall_s=wall,
        throughput=ok / wall if wall > 0 else 0.0,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        total_target=_verdict(p95, TOTAL_TARGET_MS),
        stages=stages,
        kafka_hops=hops,
        kafka_records_per_request=recs,
        kafka_bytes_per_request=nbytes,
        kafka_by_topic=by_topic,
    )


# -- output ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.0f}"


def _stage_cell(s: StageFigure) -> str:
    if s.source == "triton-stats":
        return f"~{_ms(s.mean_ms)}" if s.mean_ms is not None else "-"
    return f"{_ms(s.p50_ms)}/{_ms(s.p95_ms)}"


def _targets_cell(r: PointResult) -> str:
    mark = {"met": "+", "missed": "x", "n/a": "?"}
    return "".join(mark[s.verdict] for s in r.stages.values()) + mark[r.total_target]


HEADER = (
    f"{'arch':>7} | {'workload':>8} | {'conc':>4} | {'n':>4} | {'img/s':>6} | {'p50':>6} | "
    f"{'p95':>6} | {'p99':>6} | {'prompt':>9} | {'image':>9} | {'sampling':>11} | "
    f"{'decoding':>9} | {'hops':>4} | {'rec/req':>7} | {'KB/req':>7} | {'PISDT':>5}"
)


def format_point(r: PointResult) -> str:
    n = f"{r.requests - r.failed}" + ("!" if r.failed else "") + ("*" if r.as_txt2img else "")
    s = r.stages
    return (
        f"{r.architecture:>7} | {r.workload:>8} | {r.concurrency:>4} | {n:>4} | "
        f"{r.throughput:6.2f} | {_ms(r.p50_ms):>6} | {_ms(r.p95_ms):>6} | {_ms(r.p99_ms):>6} | "
        f"{_stage_cell(s['prompt']):>9} | {_stage_cell(s['image']):>9} | "
        f"{_stage_cell(s['sampling']):>11} | {_stage_cell(s['decoding']):>9} | "
        f"{r.kafka_hops:4.1f} | {r.kafka_records_per_request:7.1f} | "
        f"{r.kafka_bytes_per_request / 1024:7.1f} | {_targets_cell(r):>5}"
    )


LEGEND = (
    "img/s = images per second; p50/p95/p99 = end to end (ms, this process's clock); stage "
    "cells = p50/p95 ms from the answers' timings_ms, or ~mean ms per request from Triton's "
    "per-model statistics (BLS reports no timings of its own); hops = Kafka records per request "
    "on the request, hand-off and answer topics; rec/req and KB/req = every record the broker "
    "took during the point (progress events and the gateway's job registry included), per "
    "request; PISDT = the seed's p95 targets for prompt < 1000, image < 500, sampling < 2000, "
    "decoding < 500, total < 5000 ms: + met, x missed, ? not measurable (no img2img request, "
    "or a mean only); n: ! = some failed, * = img2img requests run as text-to-image"
)


# -- entry -----------------------------------------------------------------------------------


def add_architecture_arguments(p: argparse.ArgumentParser) -> None:
    """`orchestrator bench`'s flags of this comparison (the rest are the bench's own)."""
    p.add_argument(
        "--architectures",
        nargs="?",
        const=",".join(ARCHITECTURES),
        default=None,
        help="compare the architectures instead (comma-separated, default all: "
        f"{', '.join(ARCHITECTURES)}) on the same workload: orchestrator/bench_architectures.py",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="with --architectures: serve the models built in this folder (DIR/repository, "
        "e.g. by `orchestrator models build --from`) instead of the first of --presets",
    )
    p.add_argument(
        "--bootstrap-servers",
        default=None,
        help="with --architectures: use this running Kafka instead of starting Tansu",
    )
    p.add_argument(
        "--triton",
        default=None,
        metavar="GRPC,HTTP",
        help="with --architectures: use this running tritonserver (gRPC and HTTP host:port) "
        "instead of starting one on the models",
    )


def _csv(value: object) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


async def _run(args: argparse.Namespace) -> list[PointResult]:
    from orchestrator.adapters.kafka_broker import TansuBroker
    from orchestrator.adapters.triton_pool import TritonPool
    from orchestrator.adapters.triton_server import TritonServer

    architectures = _csv(args.architectures)
    for a in architectures:
        if a not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {a!r} (one of {', '.join(ARCHITECTURES)})")
    concurrency = [int(c) for c in _csv(args.concurrency)]
    workloads = _csv(args.workloads)
    preset = Path(args.models_dir).name if args.models_dir else _csv(args.presets)[0]
    out_dir = Path(args.out_dir)
    run_dir = out_dir / f"architectures-{uuid.uuid4().hex[:8]}"
    results: list[PointResult] = []
    with contextlib.ExitStack() as stack_:
        run_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            broker = TansuBroker(0, log_path=run_dir / "tansu.log")
            broker.start()
            stack_.callback(broker.stop)
            broker.wait_ready(30)
            bootstrap = broker.bootstrap_servers
        if args.triton:
            triton_grpc, triton_http = _csv(args.triton)
        else:
            repo = (
                Path(args.models_dir) / "repository"
                if args.models_dir
                else ensure_models(preset, out_dir)
            )
            triton = TritonServer(repo, work_dir=run_dir / "tritonserver")
            triton.start()
            stack_.callback(triton.stop)
            triton.wait_ready()
            triton_grpc, triton_http = triton.grpc_url, triton.http_url
        async with TritonPool(triton_grpc) as pool:
            info = await pool.model_info()
        stack = Stack(
            bootstrap,
            triton_grpc,
            triton_http,
            info,
            run_dir,
            float(args.timeout),
            max(concurrency),
        )
        traffic = KafkaTraffic(bootstrap)
        await traffic.start()
        try:
            offset = 0
            for architecture in architectures:
                print(f"{architecture}: starting", flush=True)
                async with driver_for(stack, architecture) as driver:
                    warm = workload_requests("mixed", args.warmup, args.steps, info, 100_000)
                    if warm:  # in parallel: each of Triton's model instances warms up
                        await closed_loop(warm, max(4, *concurrency), driver.send)
                    print(HEADER, flush=True)
                    for workload in workloads:
                        for c in concurrency:
                            # the same requests (seeds, prompts) for every architecture
                            requests = workload_requests(
                                workload, args.requests, args.steps, info, offset
                            )
                            point = await measure_point(
                                stack,
                                driver,
                                traffic,
                                preset=preset,
                                architecture=architecture,
                                workload=workload,
                                concurrency=c,
                                requests=requests,
                            )
                            print(format_point(point), flush=True)
                            results.append(point)
                            offset += args.requests
                offset = 0
        finally:
            await traffic.stop()
    return results


def run_architectures(args: argparse.Namespace) -> int:
    """`orchestrator bench --architectures[=LIST]`: print the table, write --json."""
    import logging

    for noisy in ("orchestrator", "aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = Path("/proc/loadavg").read_text().strip()
    started = time.monotonic()
    print(
        f"bench --architectures: {args.architectures}; models "
        f"{args.models_dir or _csv(args.presets)[0]}; "
        f"workloads {args.workloads}; concurrency {args.concurrency}; {args.requests} requests "
        f"per point; {args.steps} steps; {os.cpu_count()} CPU cores; load {load_before}",
        flush=True,
    )
    results = asyncio.run(_run(args))
    elapsed = time.monotonic() - started
    load_after = Path("/proc/loadavg").read_text().strip()
    print()
    print("results")
    print(HEADER)
    for r in results:
        print(format_point(r))
    print()
    print(LEGEND)
    print(f"load average before {load_before}; after {load_after}")
    if args.json is not None:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "elapsed_s": elapsed,
            "targets_p95_ms": {**{n: t for n, _, t in STAGES}, "total": TOTAL_TARGET_MS},
            "results": [dataclasses.asdict(r) for r in results],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"json: {args.json}")
    failed = sum(r.failed for r in results)
    print(f"bench finished in {elapsed:.0f} s; {failed} requests failed")
    return 1 if failed else 0
