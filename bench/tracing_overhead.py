"""Tracing overhead: the same workload through the real service with tracing off and on.

Real Tansu, real tritonserver (micro preset, where per-call overhead matters most), the service
in-process; "on" exports every span over OTLP/gRPC (BatchSpanProcessor) to a receiver started
here, as a production collector would receive them. Runs alternate off/on to spread noise.

    .venv/bin/python bench/tracing_overhead.py [--requests 40] [--concurrency 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.client import Client
from orchestrator.config import load_settings
from orchestrator.domain import GenerationRequest
from orchestrator.models.build import ensure_preset
from orchestrator.service import Service, kafka_settings
from orchestrator.testing import OtlpReceiver


async def one_run(
    broker: TansuBroker, triton: TritonServer, traced: bool, otlp: str, args: argparse.Namespace
) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        None,
        bootstrap_servers=broker.bootstrap_servers,
        triton_url=triton.grpc_url,
        request_topic=f"req-{tag}",
        response_topic=f"resp-{tag}",
        dlq_topic=f"dlq-{tag}",
        group_id=f"g-{tag}",
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
        rebalance_timeout_ms=2000,
        http_port=0,
        tracing=traced,
        max_in_flight=args.concurrency,
    )
    await create_topics(
        broker.bootstrap_servers,
        [settings.request_topic, settings.response_topic, settings.dlq_topic],
        partitions=2,
    )
    provider = None
    if traced:
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp, insecure=True))
        )
    ready = asyncio.Event()
    service = Service(settings, on_ready=ready.set, tracer_provider=provider)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(ready.wait(), 60)
    client = Client(
        kafka_settings(settings),
        request_topic=settings.request_topic,
        response_topic=settings.response_topic,
        dlq_topic=settings.dlq_topic,
        tracer_provider=provider,
    )
    await client.start()
    sem = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            answer = await client.generate(
                GenerationRequest(
                    prompt=f"overhead {i}", seed=i, steps=args.steps, scheduler="ddim"
                ),
                300,
            )
            assert answer.ok, answer.reason
            latencies.append(time.perf_counter() - t0)

    # warm-up, then the measured run
    await asyncio.gather(*(one(10_000 + i) for i in range(args.concurrency)))
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    wall = time.perf_counter() - start
    await client.stop()
    service.stop()
    await task
    if provider is not None:
        provider.shutdown()
    latencies.sort()
    return {
        "throughput": args.requests / wall,
        "p50": statistics.median(latencies) * 1000,
        "p95": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
    }


async def main_async(args: argparse.Namespace) -> int:
    cache = Path(args.models_dir)
    ensure_preset(args.preset, cache)
    receiver = OtlpReceiver()
    receiver.start()
    broker = TansuBroker(0)
    broker.start()
    broker.wait_ready(30)
    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    triton = TritonServer(cache / "repository", work_dir=work)
    triton.start()
    triton.wait_ready(180)
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                r = await one_run(broker, triton, mode == "on", receiver.endpoint, args)
                results[mode].append(r)
                print(
                    f"  {mode:3s}: {r['throughput']:.2f} img/s, p50 {r['p50']:.0f} ms, "
                    f"p95 {r['p95']:.0f} ms",
                    flush=True,
                )
    finally:
        triton.stop()
        broker.stop()
        receiver.stop()

    def mean(mode: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results[mode])

    print(
        f"\ntracing overhead, preset {args.preset}, {args.requests} requests x {args.steps} "
        f"steps, concurrency {args.concurrency}, {args.rounds} rounds alternating off/on "
        f"({len(receiver.spans())} spans exported over OTLP/gRPC)"
    )
    print(f"{'tracing':8s} {'img/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for mode in ("off", "on"):
        print(
            f"{mode:8s} {mean(mode, 'throughput'):8.2f} {mean(mode, 'p50'):8.0f} "
            f"{mean(mode, 'p95'):8.0f}"
        )
    tput = mean("on", "throughput") / mean("off", "throughput")
    p50 = mean("on", "p50") / mean("off", "p50")
    print(
        f"on/off: throughput x{tput:.3f} ({(1 - tput) * 100:+.1f}% cost), "
        f"p50 x{p50:.3f} ({(p50 - 1) * 100:+.1f}%)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="micro", choices=["micro", "tiny"])
    parser.add_argument("--models-dir", default="build/bench/micro")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
