"""Priority under overload (issue 10): high-priority latency at 3x capacity vs an idle service.

Real Tansu, real tritonserver (micro preset), the real Service in this process, driven through
Kafka by `orchestrator.bench.kafka_sender` (latency: produce to answer, client side):

1. idle: `--idle` high requests one at a time, nothing else: the idle p95 of a high request;
2. capacity: `--capacity-requests` normal requests closed loop at `--active` concurrency: jobs/s;
3. overload, with priority: open loop (requests sent on a fixed schedule, answers not awaited) at
   `--factor` x capacity for `--overload-s` seconds, every 10th request high (`--high-every`),
   the others low; then every answer is awaited (each low must complete);
4. the same without priority (every request normal), for contrast: the would-be highs' p95.

Target: high p95 under overload <= 1.5 x idle p95, and every low completes. The read-ahead
(`--read-ahead`, ORCHESTRATOR_MAX_IN_FLIGHT) must cover the backlog, or highs wait in Kafka
behind lows the service has not fetched (docs/operations.md).

    .venv/bin/python bench/priority.py [--active 4] [--steps 10] [--overload-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.adapters.child_process import free_port
from orchestrator.adapters.kafka_broker import TansuBroker
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.bench import RpcTimer, Send, closed_loop, ensure_models, kafka_sender
from orchestrator.domain import GenerationRequest


def request(i: int, priority: str, steps: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"a priority bench prompt {i % 7}",
        seed=i,
        steps=steps,
        scheduler="euler",
        request_id=f"prio-{uuid.uuid4().hex[:12]}",
        priority=priority,
    )


def p(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000.0, q)) if values else float("nan")


@dataclasses.dataclass
class Overload:
    sent: int
    offered_per_s: float
    wall_s: float
    #: latencies (s) of the 1-in-`high_every` requests and of the others
    marked: list[float]
    others: list[float]
    failed: int


async def open_loop(
    send: Send, rate: float, duration_s: float, high_every: int, steps: int, priority: bool
) -> Overload:
    """Send at `rate`/s for `duration_s` without waiting for answers, then await them all."""
    marked: list[float] = []
    others: list[float] = []
    failed = 0

    async def one(r: GenerationRequest, is_marked: bool) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            await send(r)
        except Exception as exc:
            failed += 1
            print(f"  {r.request_id} ({r.priority}) failed: {exc}", flush=True)
            return
        (marked if is_marked else others).append(time.perf_counter() - t0)

    tasks = []
    start = time.perf_counter()
    n = int(rate * duration_s)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        is_marked = i % high_every == 0
        cls = ("high" if is_marked else "low") if priority else "normal"
        tasks.append(asyncio.create_task(one(request(i, cls, steps), is_marked)))
    sent_wall = time.perf_counter() - start
    await asyncio.gather(*tasks)
    return Overload(n, n / sent_wall, time.perf_counter() - start, marked, others, failed)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """The service's admission wait and job time sums and counts, by priority."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("orchestrator_admission_wait_seconds_"):
                out[(sample.name.rsplit("_", 1)[1], sample.labels["priority"])] = sample.value
    return out


def waits(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> str:
    """Mean wait for a slot per priority between two scrapes."""
    parts = []
    for priority in ("high", "normal", "low"):
        n = after.get(("count", priority), 0.0) - before.get(("count", priority), 0.0)
        total = after.get(("sum", priority), 0.0) - before.get(("sum", priority), 0.0)
        if n:
            parts.append(f"{priority} {total / n * 1000:.0f} ms (n={n:.0f})")
    return "mean wait for a slot in the service: " + ", ".join(parts)


def report(name: str, o: Overload, idle_p95: float, marked: str, other: str) -> float:
    ratio = p(o.marked, 95) / idle_p95
    print(
        f"  {name}: {o.sent} sent at {o.offered_per_s:.2f}/s, all answered after {o.wall_s:.1f} s"
        f", {o.failed} failed"
    )
    print(f"    {'':12s} {'n':>5s} {'p50 ms':>9s} {'p95 ms':>9s} {'max ms':>9s}")
    for label, values in ((marked, o.marked), (other, o.others)):
        print(
            f"    {label:12s} {len(values):5d} {p(values, 50):9.1f} {p(values, 95):9.1f} "
            f"{p(values, 100):9.1f}"
        )
    print(f"    {marked} p95 / idle high p95 = {ratio:.2f}")
    return ratio


async def run(broker: TansuBroker, triton: TritonServer, args: argparse.Namespace) -> int:
    port = free_port()
    ctx = kafka_sender(
        "step",
        broker.bootstrap_servers,
        triton.grpc_url,
        args.read_ahead,
        600.0,
        RpcTimer(),
        max_active_jobs=args.active,
        admission_aging_s=args.aging_s,
        tracing=False,
        http_port=port,
        http_host="127.0.0.1",
    )
    async with ctx as send:
        warm = [request(i, "normal", args.steps) for i in range(2 * args.active)]
        await closed_loop(warm, args.active, send)
        idle, _, _ = await closed_loop(
            [request(i, "high", args.steps) for i in range(args.idle)], 1, send
        )
        idle_p95 = p(idle, 95)
        reqs = [request(i, "normal", args.steps) for i in range(args.capacity_requests)]
        lat, failed, wall = await closed_loop(reqs, args.active, send)
        capacity = len(lat) / wall
        rate = args.factor * capacity
        print(
            f"\npriority under overload, micro preset, {args.steps} steps, max_active_jobs "
            f"{args.active}, read-ahead {args.read_ahead}, aging {args.aging_s:.0f} s"
        )
        print(f"  idle high: n={len(idle)} p50 {p(idle, 50):.1f} ms, p95 {idle_p95:.1f} ms")
        print(
            f"  capacity: {capacity:.2f} jobs/s ({len(lat)} jobs at concurrency {args.active}, "
            f"p50 {p(lat, 50):.0f} ms, {failed} failed)"
        )
        print(f"  offered: {args.factor:.1f} x capacity = {rate:.2f}/s for {args.overload_s} s")
        before = await asyncio.to_thread(scrape, port)
        prio = await open_loop(send, rate, args.overload_s, args.high_every, args.steps, True)
        ratio = report("with priority", prio, idle_p95, "high", "low")
        print("    " + waits(before, await asyncio.to_thread(scrape, port)))
        if not args.no_contrast:
            flat = await open_loop(send, rate, args.overload_s, args.high_every, args.steps, False)
            report("without priority (all normal)", flat, idle_p95, "1-in-10", "others")
    lows_done = prio.failed == 0 and len(prio.others) == prio.sent - len(prio.marked)
    print(
        f"  target high p95 <= 1.5 x idle: {'MET' if ratio <= 1.5 else 'MISSED'} ({ratio:.2f}); "
        f"every low completed: {'yes' if lows_done else 'NO'}"
    )
    return 0 if lows_done else 1


async def main_async(args: argparse.Namespace) -> int:
    repository = ensure_models("micro", Path(args.models_dir))
    broker = TansuBroker(0)
    broker.start()
    triton = TritonServer(repository, work_dir=Path(tempfile.mkdtemp(prefix="prio-")))
    try:
        broker.wait_ready(30)
        triton.start()
        triton.wait_ready(180)
        return await run(broker, triton, args)
    finally:
        triton.stop()
        broker.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--active", type=int, default=4, help="max_active_jobs")
    parser.add_argument("--read-ahead", type=int, default=4096, help="max_in_flight")
    parser.add_argument("--aging-s", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--idle", type=int, default=20, help="idle high requests")
    parser.add_argument("--capacity-requests", type=int, default=40)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--high-every", type=int, default=10, help="1 in N requests is high")
    parser.add_argument("--no-contrast", action="store_true", help="skip the all-normal run")
    parser.add_argument("--models-dir", default="build/bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
