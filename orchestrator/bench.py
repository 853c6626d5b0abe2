"""`orchestrator bench`: step batching vs naive per-job calls vs the pure-Triton BLS pipeline.

Starts the real stack itself: tritonserver on a generated repository per preset (built into
`OUT_DIR/<preset>` when missing) and, for the service path, a Tansu broker with the real service
running in this process (Kafka in, Kafka out, answers matched by correlation id). `--no-kafka`
drives `run_job` directly instead: against `TritonClient` (naive) or a `StepBatcher` (step).
The BLS baseline is one gRPC call per image to the `pipeline_bls` model, which runs the whole
pipeline inside Triton.

Every run sends `--requests` requests with at most `concurrency` in flight (closed loop) and
reads Triton's statistics (HTTP `/v2/models/stats`) before and after:

- unet batch: rows per UNet execution = delta inference_count / delta execution_count;
- compute/call: Triton's compute time (compute_input + compute_infer + compute_output) per
  request of each stage model, charged to every job call that request carried;
- queue/call: the same for Triton's queue time (its dynamic batcher waits up to 1 ms);
- overhead/call: (sum of end-to-end latencies - charged compute - charged queue) / job model
  calls. At concurrency 1 that is what the orchestrator (plus gRPC, the Python backend's IPC
  and, on the service path, Kafka) adds per call; above 1 it also holds time spent waiting for
  other requests' work (CPU contention, batch assembly), so read it at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, start_job
from orchestrator.domain import GenerationRequest, ModelInfo, StageCall

MODES = ("naive", "step", "bls")
WORKLOADS = ("uniform", "mixed")
UNIFORM_SCHEDULER = "ddim"
MIXED_SCHEDULERS = ("ddim", "euler", "dpmpp_2m", "euler_a", "pndm", "lms", "unipc")
BLS_MODEL = "pipeline_bls"
#: models whose compute a job's call is charged with (the ensemble runs tokenizer+text_encoder)
CHARGED_MODELS: Mapping[str, tuple[str, ...]] = {
    ENCODE_PROMPT: ("tokenizer", "text_encoder"),
    VAE_ENCODER: (VAE_ENCODER,),
    UNET: (UNET,),
    VAE_DECODER: (VAE_DECODER,),
}
STAT_MODELS = ("tokenizer", "text_encoder", VAE_ENCODER, UNET, VAE_DECODER, BLS_MODEL)

Stats = dict[str, dict[str, int]]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--presets", default="micro", help="comma-separated: micro, tiny (default micro)"
    )
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight bounds")
    p.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (mixed: mean)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: naive, step, bls")
    p.add_argument(
        "--workloads", "--workload", default=",".join(WORKLOADS), help="uniform, mixed"
    )
    from orchestrator.bench_architectures import add_architecture_arguments

    add_architecture_arguments(p)
    p.add_argument(
        "--no-kafka",
        action="store_true",
        help="drive run_job directly (TritonClient / StepBatcher) instead of the Kafka service",
    )
    p.add_argument("--out-dir", type=Path, default=Path("build/bench"), help="models and logs")
    p.add_argument(
        "--plot-dir", type=Path, default=Path("docs"), help="where bench-<preset>.png goes"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", type=Path, default=None, help="also write results as JSON here")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per mode")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument(
        "--triton-servers",
        default="1",
        help="comma-separated numbers of tritonservers to run side by side (e.g. 1,2,3): the "
        "orchestrator spreads its calls over them (ratios use the smallest number)",
    )


@dataclasses.dataclass
class RunResult:
    preset: str
    path: str  # kafka | direct | grpc
    mode: str
    workload: str
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    unet_batch: float
    unet_executions: int
    job_calls: int
    triton_requests: int
    compute_ms_per_call: float
    queue_ms_per_call: float
    overhead_ms_per_call: float
    #: of which outside the gRPC calls (pipeline math, batcher, Kafka, Avro): e2e - rpc wall
    orch_ms_per_call: float
    #: of which inside the gRPC calls but not Triton compute/queue (gRPC, Python-backend IPC)
    transport_ms_per_call: float
    #: tritonservers the calls were spread over
    servers: int = 1


# -- workloads -------------------------------------------------------------------------------


def make_requests(workload: str, n: int, steps: int, offset: int = 0) -> list[GenerationRequest]:
    """`uniform`: the same steps and scheduler; `mixed`: steps S/2, S, 3S/2 and 7 schedulers."""
    out = []
    low, high = max(1, steps // 2), steps + steps // 2
    for k in range(n):
        i = k + offset
        if workload == "uniform":
            s, scheduler = steps, UNIFORM_SCHEDULER
        elif workload == "mixed":
            s = (low, steps, high)[i % 3]
            scheduler = MIXED_SCHEDULERS[i % len(MIXED_SCHEDULERS)]
        else:
            raise ValueError(f"unknown workload {workload!r}")
        out.append(
            GenerationRequest(
                prompt=f"a bench prompt number {i % 7}",
                seed=i,
                steps=s,
                scheduler=scheduler,
                guidance_scale=7.5,
                request_id=f"bench-{uuid.uuid4().hex[:12]}",
            )
        )
    return out


def job_calls(requests: Sequence[GenerationRequest], info: ModelInfo) -> dict[str, int]:
    """Model calls each request's job makes, per model (the same in every mode)."""
    calls = {ENCODE_PROMPT: 0, VAE_ENCODER: 0, UNET: 0, VAE_DECODER: 0}
    for r in requests:
        job = start_job(r, info)
        calls[ENCODE_PROMPT] += 1
        calls[UNET] += job.total_unet_calls
        calls[VAE_DECODER] += 1
    return calls


def bls_call(r: GenerationRequest) -> StageCall:
    def text(v: str) -> npt.NDArray[Any]:
        return np.array([[v.encode("utf-8")]], dtype=np.object_)

    return StageCall(
        BLS_MODEL,
        {
            "prompt": text(r.prompt),
            "negative_prompt": text(r.negative_prompt),
            "seed": np.array([[r.seed]], dtype=np.int64),
            "steps": np.array([[r.steps]], dtype=np.int32),
            "guidance_scale": np.array([[r.guidance_scale]], dtype=np.float32),
            "scheduler": text(r.scheduler),
            "width": np.array([[r.width or 0]], dtype=np.int32),
            "height": np.array([[r.height or 0]], dtype=np.int32),
        },
        ("image",),
    )


# -- Triton statistics -----------------------------------------------------------------------


def read_stats(http_urls: Sequence[str]) -> Stats:
    """Per model, summed over the servers: inference/execution counts, request count, compute
    and queue time (ns)."""
    out: Stats = {}
    for http_url in http_urls:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as resp:
            body = json.loads(resp.read())
        for m in body.get("model_stats", []):
            s = m.get("inference_stats", {})

            def ns(key: str, s: dict[str, Any] = s) -> int:
                return int(s.get(key, {}).get("ns", 0))

            values = {
                "inference_count": int(m.get("inference_count", 0)),
                "execution_count": int(m.get("execution_count", 0)),
                "requests": int(s.get("success", {}).get("count", 0)),
                "compute_ns": ns("compute_input") + ns("compute_infer") + ns("compute_output"),
                "queue_ns": ns("queue"),
            }
            into = out.setdefault(m["name"], {})
            for key, value in values.items():
                into[key] = into.get(key, 0) + value
    return out


def stats_delta(before: Stats, after: Stats) -> Stats:
    return {
        name: {k: v - before.get(name, {}).get(k, 0) for k, v in values.items()}
        for name, values in after.items()
    }


def percentiles(values_ms: Sequence[float] | npt.NDArray[Any]) -> tuple[float, float, float]:
    """p50, p95, p99 of latencies (NaN for none): every bench's one definition."""
    if len(values_ms) == 0:
        return float("nan"), float("nan"), float("nan")
    p50, p95, p99 = np.percentile(np.asarray(values_ms, dtype=np.float64), [50, 95, 99])
    return float(p50), float(p95), float(p99)


def summarize(
    *,
    preset: str,
    path: str,
    mode: str,
    workload: str,
    concurrency: int,
    latencies: Sequence[float],
    failed: int,
    wall_s: float,
    calls: Mapping[str, int],
    delta: Stats,
    rpc_s: float,
) -> RunResult:
    lat_ms = np.array(latencies, dtype=np.float64) * 1000.0
    unet = delta.get(UNET, {})
    executions = unet.get("execution_count", 0)
    compute = queue = 0.0
    for model, n_calls in calls.items():
        for stat_model in CHARGED_MODELS[model]:
            d = delta.get(stat_model, {})
            reqs = d.get("requests", 0)
            if reqs and n_calls:
                compute += d["compute_ns"] / reqs * n_calls
                queue += d["queue_ns"] / reqs * n_calls
    total_calls = sum(calls.values())
    triton_requests = sum(
        delta.get(m, {}).get("requests", 0) for m in (ENCODE_PROMPT, VAE_ENCODER, UNET, VAE_DECODER)
    )
    # the ensemble's own request count may be missing from the stats; count text_encoder's then
    if ENCODE_PROMPT not in delta:
        triton_requests += delta.get("text_encoder", {}).get("requests", 0)
    e2e_ns = float(lat_ms.sum()) * 1e6
    p50, p95, p99 = percentiles(lat_ms)
    per_call = 1e-6 / total_calls if total_calls else 0.0
    ok = len(latencies)
    return RunResult(
        preset=preset,
        path=path,
        mode=mode,
        workload=workload,
        concurrency=concurrency,
        requests=ok + failed,
        failed=failed,
        wall_s=wall_s,
        throughput=ok / wall_s if wall_s > 0 else 0.0,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        unet_batch=unet.get("inference_count", 0) / executions if executions else 0.0,
        unet_executions=executions,
        job_calls=total_calls,
        triton_requests=triton_requests,
        compute_ms_per_call=compute * per_call,
        queue_ms_per_call=queue * per_call,
        overhead_ms_per_call=(e2e_ns - compute - queue) * per_call,
        orch_ms_per_call=(e2e_ns - rpc_s * 1e9) * per_call,
        transport_ms_per_call=(rpc_s * 1e9 - compute - queue) * per_call,
    )


# -- drivers ---------------------------------------------------------------------------------


@dataclasses.dataclass
class RpcTimer:
    """Wall time spent inside Triton gRPC calls, as the calling process saw it, and the tensor
    bytes those calls sent and received as the caller holds them (per model in `by_model`:
    calls, bytes_in, bytes_out, and `fp32_bytes`: those of float32 tensors other than
    `timestep`, which a half-precision model's wire carries in half the bytes)."""

    busy_s: float = 0.0
    calls: int = 0
    by_model: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def wrap(self, infer: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(call: StageCall, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out: Any = None
            try:
                out = await infer(call, **kwargs)
                return out
            finally:
                self.busy_s += time.perf_counter() - t0
                self.calls += 1
                m = self.by_model.setdefault(
                    call.model, {"calls": 0, "bytes_in": 0, "bytes_out": 0, "fp32_bytes": 0}
                )
                m["calls"] += 1
                tensors = list(call.inputs.items())
                m["bytes_in"] += sum(int(a.nbytes) for _, a in tensors)
                if isinstance(out, Mapping):
                    tensors += list(out.items())
                    m["bytes_out"] += sum(int(getattr(a, "nbytes", 0)) for a in out.values())
                m["fp32_bytes"] += sum(
                    int(a.nbytes)
                    for name, a in tensors
                    if name != "timestep" and getattr(a, "dtype", None) == np.float32
                )

        return timed


class _TimedRunner:
    def __init__(self, runner: Any, timer: RpcTimer) -> None:
        self._infer = timer.wrap(runner.infer)

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        out: dict[str, npt.NDArray[Any]] = await self._infer(call)
        return out


#: one request, start to answer; raises on failure
Send = Callable[[GenerationRequest], Any]


async def closed_loop(
    requests: Sequence[GenerationRequest], concurrency: int, send: Send
) -> tuple[list[float], int, float]:
    """Run `send` over the requests with at most `concurrency` in flight.

    Returns (latencies of the successes in seconds, failures, wall time).
    """
    queue = list(reversed(requests))
    latencies: list[float] = []
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while queue:
            r = queue.pop()
            t0 = time.perf_counter()
            try:
                await send(r)
            except Exception as exc:
                failed += 1
                print(f"  request {r.request_id} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return latencies, failed, time.perf_counter() - start


def _max_rows(info: ModelInfo) -> dict[str, int]:
    return {m: info.max_rows(m) or 64 for m in (UNET, ENCODE_PROMPT, VAE_ENCODER, VAE_DECODER)}


@contextlib.asynccontextmanager
async def direct_sender(
    mode: str, triton_url: str, timeout: float, timer: RpcTimer
) -> AsyncIterator[Send]:
    """run_job against the Triton endpoints (naive) or a StepBatcher (step), or gRPC calls to
    BLS; `triton_url` may list several endpoints (one pool spreads the calls)."""
    from orchestrator.adapters.triton_pool import TritonPool
    from orchestrator.batcher import StepBatcher
    from orchestrator.config import load_settings
    from orchestrator.core.batching import CohortPolicy
    from orchestrator.executor import run_job
    from orchestrator.prompt_cache import prompt_cache_runner

    async with TritonPool(triton_url, timeout_s=timeout) as triton:
        info = await triton.model_info()
        client = _TimedRunner(triton, timer)
        # as the service: encode_prompt behind the prompt-embedding cache (ORCHESTRATOR_PROMPT_*)
        cached = prompt_cache_runner(triton, load_settings(None), inner=client)
        if mode == "bls":

            async def send_bls(r: GenerationRequest) -> Any:
                out = await client.infer(bls_call(r))
                if out["image"].shape[0] != 1:
                    raise RuntimeError("pipeline_bls returned the wrong number of images")
                return out

            yield send_bls
        elif mode == "naive":

            async def send_naive(r: GenerationRequest) -> Any:
                return await run_job(start_job(r, info), cached)

            yield send_naive
        else:
            cohorts = CohortPolicy(load_settings(None).batch_cohorts)  # ORCHESTRATOR_BATCH_COHORTS
            batcher = StepBatcher(cached, _max_rows(info), cohorts=cohorts)

            async def send_step(r: GenerationRequest) -> Any:
                async with batcher.job():
                    return await run_job(start_job(r, info), batcher)

            yield send_step


def answer_sender(client: Any, timeout: float) -> Send:
    """Produce a request with `client` (an orchestrator Client) and wait for its answer, matched
    by correlation id; returns the Answer, raises when it is not a success."""

    async def send(r: GenerationRequest) -> Any:
        answer = await client.generate(r, timeout=timeout)
        if not answer.ok:
            raise RuntimeError(answer.reason)
        return answer

    return send


@contextlib.asynccontextmanager
async def kafka_sender(
    mode: str,
    bootstrap: str,
    triton_url: str,
    max_in_flight: int,
    timeout: float,
    timer: RpcTimer,
    **overrides: Any,
) -> AsyncIterator[Send]:
    """The real service (in this process) with `batching=mode`, and a Kafka client for it;
    `overrides` are further settings of the service (``max_active_jobs=4``, say)."""
    from orchestrator.adapters.kafka_broker import create_topics
    from orchestrator.client import Client
    from orchestrator.config import load_settings
    from orchestrator.service import Service, kafka_settings

    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        None,
        bootstrap_servers=bootstrap,
        triton_url=triton_url,
        request_topic=f"bench-req-{tag}",
        response_topic=f"bench-resp-{tag}",
        dlq_topic=f"bench-dlq-{tag}",
        progress_topic=f"bench-progress-{tag}",
        control_topic=f"bench-control-{tag}",
        group_id=f"bench-{tag}",
        batching=mode,
        max_in_flight=max_in_flight,
        triton_timeout_s=timeout,
        **overrides,
    )
    await create_topics(bootstrap, settings.service_topics(), 2)
    ready = asyncio.Event()
    service = Service(settings, on_ready=ready.set)
    # time the service's Triton calls (naive runner and batcher both call service.triton.infer)
    triton_infer = timer.wrap(service.triton.infer)
    setattr(service.triton, "infer", triton_infer)  # noqa: B010
    task = asyncio.create_task(service.run())
    client = Client(
        kafka_settings(settings),
        request_topic=settings.request_topic,
        response_topic=settings.response_topic,
        dlq_topic=settings.dlq_topic,
    )
    try:
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait([task, waiter], timeout=120, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        if not ready.is_set():
            raise RuntimeError("the service did not become ready in 120 s")
        await client.start()

        yield answer_sender(client, timeout)
    finally:
        with contextlib.suppress(Exception):
            await client.stop()
        service.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)


# -- one preset ------------------------------------------------------------------------------


def ensure_models(preset: str, out_dir: Path) -> Path:
    from orchestrator.models.build import ensure_preset

    return ensure_preset(preset, out_dir / preset)


async def bench_preset(
    preset: str,
    args: argparse.Namespace,
    bootstrap: str | None,
    triton_url: str,
    http_urls: Sequence[str],
) -> list[RunResult]:
    from orchestrator.adapters.triton_pool import TritonPool

    async with TritonPool(triton_url) as client:
        info = await client.model_info()
    concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    modes = [m.strip() for m in str(args.modes).split(",") if m.strip()]
    workloads = [w.strip() for w in str(args.workloads).split(",") if w.strip()]
    results: list[RunResult] = []
    offset = 0
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        timer = RpcTimer()
        path = "grpc" if mode == "bls" else ("direct" if bootstrap is None else "kafka")
        if path == "kafka":
            assert bootstrap is not None
            ctx = kafka_sender(mode, bootstrap, triton_url, max(concurrency), args.timeout, timer)
        else:
            ctx = direct_sender(mode, triton_url, args.timeout, timer)
        async with ctx as send:
            warm = make_requests("mixed", args.warmup, args.steps, offset=10_000)
            if warm:
                await closed_loop(warm, min(max(concurrency), len(warm)), send)
            for workload in workloads:
                for c in concurrency:
                    requests = make_requests(workload, args.requests, args.steps, offset)
                    offset += len(requests)
                    before = read_stats(http_urls)
                    rpc_before = timer.busy_s
                    latencies, failed, wall = await closed_loop(requests, c, send)
                    delta = stats_delta(before, read_stats(http_urls))
                    result = summarize(
                        preset=preset,
                        path=path,
                        mode=mode,
                        workload=workload,
                        concurrency=c,
                        latencies=latencies,
                        failed=failed,
                        wall_s=wall,
                        calls=job_calls(requests, info),
                        delta=delta,
                        rpc_s=timer.busy_s - rpc_before,
                    )
                    result.servers = len(http_urls)
                    print("  " + format_row(result), flush=True)
                    results.append(result)
    return results


# -- output ----------------------------------------------------------------------------------

COLUMNS = (
    ("preset", 6, "{}"),
    ("srv", 3, "{}"),
    ("path", 6, "{}"),
    ("mode", 5, "{}"),
    ("workload", 8, "{}"),
    ("conc", 4, "{}"),
    ("n", 4, "{}"),
    ("img/s", 7, "{:.2f}"),
    ("p50 ms", 8, "{:.1f}"),
    ("p95 ms", 8, "{:.1f}"),
    ("p99 ms", 8, "{:.1f}"),
    ("unet batch", 10, "{:.2f}"),
    ("calls", 6, "{}"),
    ("triton", 6, "{}"),
    ("compute/call", 12, "{:.2f}"),
    ("queue/call", 10, "{:.2f}"),
    ("overhead/call", 13, "{:.2f}"),
    ("orch/call", 9, "{:.2f}"),
    ("rpc/call", 8, "{:.2f}"),
)


def _cells(r: RunResult) -> list[object]:
    return [
        r.preset,
        r.servers,
        r.path,
        r.mode,
        r.workload,
        r.concurrency,
        r.requests - r.failed if not r.failed else f"{r.requests - r.failed}!",
        r.throughput,
        r.p50_ms,
        r.p95_ms,
        r.p99_ms,
        r.unet_batch,
        r.job_calls,
        r.triton_requests,
        r.compute_ms_per_call,
        r.queue_ms_per_call,
        r.overhead_ms_per_call,
        r.orch_ms_per_call,
        r.transport_ms_per_call,
    ]


def format_header() -> str:
    return " | ".join(name.rjust(width) for name, width, _ in COLUMNS)


def format_row(r: RunResult) -> str:
    return " | ".join(
        fmt.format(v).rjust(width) for (_, width, fmt), v in zip(COLUMNS, _cells(r), strict=True)
    )


def _find(
    results: Sequence[RunResult], preset: str, mode: str, workload: str, c: int
) -> RunResult | None:
    for r in results:
        if (r.preset, r.mode, r.workload, r.concurrency) == (preset, mode, workload, c):
            return r
    return None


@dataclasses.dataclass
class Ratio:
    preset: str
    name: str
    value: float
    target: str
    met: bool | None


def ratios(results: Sequence[RunResult]) -> list[Ratio]:
    out: list[Ratio] = []
    fewest = min((r.servers for r in results), default=1)
    results = [r for r in results if r.servers == fewest]
    presets = list(dict.fromkeys(r.preset for r in results))
    for p in presets:
        cs = sorted({r.concurrency for r in results if r.preset == p})
        hi, lo = cs[-1], cs[0]
        for c in cs:
            naive, step, bls = (_find(results, p, m, "uniform", c) for m in MODES)
            if step and naive and naive.throughput:
                v = step.throughput / naive.throughput
                tgt = ">= 2.00" if c == hi else ""
                out.append(Ratio(p, f"step/naive throughput @{c}", v, tgt, v >= 2 if tgt else None))
            if step and bls and bls.throughput:
                v = step.throughput / bls.throughput
                tgt = ">= 1.00" if c == hi else ""
                out.append(Ratio(p, f"step/BLS throughput @{c}", v, tgt, v >= 1 if tgt else None))
        step, naive = (
            _find(results, p, "step", "uniform", lo),
            _find(results, p, "naive", "uniform", lo),
        )
        if step and naive and naive.p50_ms:
            v = step.p50_ms / naive.p50_ms
            out.append(Ratio(p, f"step/naive p50 @{lo}", v, "<= 1.10", v <= 1.10))
        for mode in ("step", "naive"):
            r = _find(results, p, mode, "uniform", lo)
            if r is not None:
                v = r.overhead_ms_per_call
                out.append(Ratio(p, f"{mode} overhead ms/call @{lo}", v, "<= 1.00", v <= 1.0))
                v = r.orch_ms_per_call
                out.append(Ratio(p, f"{mode}  of which orchestrator @{lo}", v, "", None))
        for c in cs:
            if c == 1:
                continue
            for mode in ("step", "naive", "bls"):
                uniform, mixed = (_find(results, p, mode, w, c) for w in WORKLOADS)
                if mixed and uniform and uniform.unet_batch:
                    v = mixed.unet_batch / uniform.unet_batch
                    target = ">= 0.80" if mode == "step" else ""
                    met = v >= 0.8 if target else None
                    out.append(Ratio(p, f"{mode} mixed/uniform unet batch @{c}", v, target, met))
    return out


def format_ratios(rs: Sequence[Ratio]) -> list[str]:
    lines = []
    for r in rs:
        verdict = "" if r.met is None else ("met" if r.met else "MISSED")
        lines.append(
            f"{r.preset:>6} | {r.name:<36} | {r.value:8.2f} | {r.target:>8} | {verdict}".rstrip()
        )
    return lines


def plot(results: Sequence[RunResult], preset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        for workload, style in (("uniform", "-o"), ("mixed", "--s")):
            rows = sorted(
                (r for r in results if (r.preset, r.mode, r.workload) == (preset, mode, workload)),
                key=lambda r: r.concurrency,
            )
            if not rows:
                continue
            xs = [r.concurrency for r in rows]
            label = f"{mode} ({rows[0].path}, {workload})"
            ax1.plot(xs, [r.throughput for r in rows], style, label=label)
            ax2.plot(xs, [r.p95_ms for r in rows], style, label=label)
    for ax, title, unit in (
        (ax1, "throughput", "images/s"),
        (ax2, "p95 latency", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(unit)
        ax.set_title(f"{preset}: {title}")
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry -----------------------------------------------------------------------------------


async def _bench(args: argparse.Namespace) -> list[RunResult]:
    from orchestrator.adapters.kafka_broker import TansuBroker
    from orchestrator.adapters.triton_server import TritonServer

    presets = [p.strip() for p in str(args.presets).split(",") if p.strip()]
    modes = [m.strip() for m in str(args.modes).split(",") if m.strip()]
    out_dir = Path(args.out_dir)
    repos = {p: ensure_models(p, out_dir) for p in presets}
    broker: TansuBroker | None = None
    needs_kafka = not args.no_kafka and any(m in ("naive", "step") for m in modes)
    results: list[RunResult] = []
    try:
        if needs_kafka:
            out_dir.mkdir(parents=True, exist_ok=True)
            broker = TansuBroker(0, log_path=out_dir / "tansu.log")
            broker.start()
            broker.wait_ready(30)
        counts = [int(n) for n in str(args.triton_servers).split(",") if n.strip()]
        for preset in presets:
            for count in counts:
                print(
                    f"preset {preset}: starting {count} tritonserver(s) on {repos[preset]}",
                    flush=True,
                )
                with contextlib.ExitStack() as stack:
                    servers = [
                        TritonServer(repos[preset], work_dir=out_dir / preset / f"server-{i}")
                        for i in range(count)
                    ]
                    for server in servers:
                        server.start()
                        stack.callback(server.stop)
                    for server in servers:
                        server.wait_ready()
                    print(format_header(), flush=True)
                    results += await bench_preset(
                        preset,
                        args,
                        broker.bootstrap_servers if broker is not None else None,
                        ",".join(s.grpc_url for s in servers),
                        [s.http_url for s in servers],
                    )
    finally:
        if broker is not None:
            broker.stop()
    return results


def run_bench(args: argparse.Namespace) -> int:
    if args.architectures:
        from orchestrator.bench_architectures import run_architectures

        return run_architectures(args)
    for noisy in ("orchestrator", "aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    path = "direct run_job, no Kafka" if args.no_kafka else "the Kafka service (in-process)"
    print(
        f"bench: {os.cpu_count()} CPU cores; presets {args.presets}; concurrency "
        f"{args.concurrency}; {args.requests} requests per run; {args.steps} steps (mixed: "
        f"{max(1, args.steps // 2)}/{args.steps}/{args.steps + args.steps // 2} steps, "
        f"{len(MIXED_SCHEDULERS)} schedulers); naive/step through {path}; BLS over gRPC. "
        "Small numbers to keep a run short on CPU: figures are indicative, not tight.",
        flush=True,
    )
    results = asyncio.run(_bench(args))
    elapsed = time.monotonic() - started
    print()
    print("results")
    print(format_header())
    for r in results:
        print(format_row(r))
    print()
    print(
        "unet batch = rows per UNet execution (a guided job is 2 rows); calls = the jobs' model "
        "calls; triton = requests Triton received; compute/queue/overhead in ms per job call "
        "(overhead = (sum of latencies - Triton compute - Triton queue) / calls = orch + rpc: "
        "orch = outside the gRPC calls (pipeline math, batcher, Kafka), rpc = gRPC and Python-"
        "backend IPC; meaningful at concurrency 1, above it they hold waiting for others' work)"
    )
    rs = ratios(results)
    print()
    print("ratios (target from the issue where one applies)")
    for line in format_ratios(rs):
        print(line)
    failed = sum(r.failed for r in results)
    if not args.no_plot:
        for preset in dict.fromkeys(r.preset for r in results):
            png = Path(args.plot_dir) / f"bench-{preset}.png"
            plot(results, preset, png)
            print(f"plot: {png}")
    if args.json is not None:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
            "cpu_count": os.cpu_count(),
            "elapsed_s": elapsed,
            "results": [dataclasses.asdict(r) for r in results],
            "ratios": [dataclasses.asdict(r) for r in rs],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"json: {args.json}")
    print(f"bench finished in {elapsed:.0f} s; {failed} requests failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator bench", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
