"""Cancellation latency (issue 10): from a cancel command's produce to its job's slot being free.

Real Tansu, real tritonserver (micro preset), the real Service in this process (as the
integration tests run it), so both ends are read from the same clock (`time.time()`):

- start: just before the client produces the cancel record to the control topic;
- end: the moment the cancelled job's inner task ended, i.e. it left its StepBatcher cohort and
  freed its slot (`ServiceStats.cancel_freed_at`, recorded by the service).

Each victim is a long job (`--steps`) running in batches beside `--background` other long jobs
that keep the UNet busy; it is cancelled a random 0.1-0.6 s after it started running. The UNet
step time is the duration of the run's UNet batch calls (`ServiceStats.batches`). The target:
p95 <= one UNet step + 100 ms.

    .venv/bin/python bench/cancel_latency.py [--cancels 30] [--background 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from orchestrator.adapters.kafka_broker import TansuBroker, create_topics
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.client import Client
from orchestrator.config import load_settings
from orchestrator.core.pipeline import UNET
from orchestrator.domain import GenerationRequest
from orchestrator.models.build import ensure_preset
from orchestrator.service import Service


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


async def run(broker: TansuBroker, triton: TritonServer, args: argparse.Namespace) -> int:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        None,
        bootstrap_servers=broker.bootstrap_servers,
        triton_url=triton.grpc_url,
        request_topic=f"req-{tag}",
        response_topic=f"resp-{tag}",
        dlq_topic=f"dlq-{tag}",
        progress_topic=f"progress-{tag}",
        control_topic=f"control-{tag}",
        group_id=f"g-{tag}",
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
        rebalance_timeout_ms=2000,
        http_port=0,
        tracing=False,
        max_in_flight=args.background + 4,
    )
    await create_topics(broker.bootstrap_servers, settings.service_topics(), partitions=2)
    ready = asyncio.Event()
    service = Service(settings, on_ready=ready.set)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(ready.wait(), 120)
    client = Client.from_settings(settings)
    await client.start()
    rng = random.Random(args.seed)
    stop_background = asyncio.Event()

    async def background(i: int) -> None:
        n = 0
        while not stop_background.is_set():
            rid = f"bg-{i}-{n}"
            n += 1
            req = GenerationRequest(
                prompt=f"background {i}", seed=n, steps=args.steps, request_id=rid
            )
            answer = await client.generate(req, 600)
            assert answer.ok, answer.reason

    latencies: list[float] = []
    acked: list[float] = []
    bg = [asyncio.create_task(background(i)) for i in range(args.background)]
    try:
        await asyncio.sleep(1.0)  # the background jobs are running
        batches_from = len(service.stats.batches)
        for i in range(args.cancels):
            rid = f"victim-{i}"
            await client.send(
                GenerationRequest(prompt=f"victim {i}", seed=i, steps=args.steps, request_id=rid)
            )
            deadline = time.monotonic() + 60
            while (entry := service.cancels.job(rid)) is None or not entry.running:
                assert time.monotonic() < deadline, f"{rid} never started"
                await asyncio.sleep(0.005)
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            t_produce = time.time()
            await client.cancel(rid)
            acked.append(time.time() - t_produce)
            answer = await client.wait(rid, 60)
            assert answer.cancelled, f"{rid}: {answer.reason} (finished before its cancel?)"
            freed = service.stats.cancel_freed_at[rid]
            latencies.append(freed - t_produce)
        unet = [
            r.duration_s for r in service.stats.batches[batches_from:] if r.model == UNET and r.ok
        ]
        rows = [r.rows for r in service.stats.batches[batches_from:] if r.model == UNET]
    finally:
        stop_background.set()
        await asyncio.gather(*bg, return_exceptions=True)
        await client.stop()
        service.stop()
        await task

    ms = [x * 1000 for x in latencies]
    step_ms = [x * 1000 for x in unet]
    p95 = pct(ms, 0.95)
    bound = statistics.median(step_ms) + 100
    print(
        f"\ncancellation latency, micro preset, {len(ms)} cancels of running {args.steps}-step "
        f"jobs beside {args.background} background jobs (UNet batches of "
        f"{statistics.fmean(rows):.1f} rows on average)"
    )
    print(f"{'':28s} {'p50':>8s} {'p95':>8s} {'max':>8s}")
    print(
        f"{'produce -> slot free (ms)':28s} {statistics.median(ms):8.1f} {p95:8.1f} {max(ms):8.1f}"
    )
    print(
        f"{'produce -> broker ack (ms)':28s} {statistics.median(acked) * 1000:8.1f} "
        f"{pct(acked, 0.95) * 1000:8.1f} {max(acked) * 1000:8.1f}"
    )
    print(
        f"{'UNet step, one call (ms)':28s} {statistics.median(step_ms):8.1f} "
        f"{pct(step_ms, 0.95):8.1f} {max(step_ms):8.1f}   ({len(step_ms)} calls)"
    )
    verdict = "MET" if p95 <= bound else "MISSED"
    print(f"target p95 <= one UNet step (p50) + 100 ms = {bound:.1f} ms: {verdict}")
    return 0


async def main_async(args: argparse.Namespace) -> int:
    cache = Path(args.models_dir)
    ensure_preset("micro", cache)
    broker = TansuBroker(0)
    broker.start()
    work = Path(tempfile.mkdtemp(prefix="bench-cancel-"))
    triton = TritonServer(cache / "repository", work_dir=work)
    try:
        broker.wait_ready(30)
        triton.start()
        triton.wait_ready(180)
        return await run(broker, triton, args)
    finally:
        triton.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cancels", type=int, default=30)
    parser.add_argument("--background", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--models-dir", default="build/bench/micro")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
