"""UNet idle time between executions (issue 14, "Keep the UNet busy").

Runs closed loops of requests at one concurrency through `run_job`, in naive mode and in step
mode with each number of batcher cohorts asked for (`StepBatcher`, `CohortPolicy`), against the
real tritonserver, and reports for each run the throughput and the UNet's idle share of the
wall time, measured two ways:

- Triton's side: wall - the UNet's execution time, from Triton's per-model statistics
  (`batch_stats`: compute input + infer + output of every execution, whatever its batch size;
  one model instance, so executions do not overlap);
- the orchestrator's side: wall - the time at least one UNet call is in flight (each call's
  start and end around the gRPC call, below the batcher), which counts the transport as busy.

Two parts:

- `echo`: the echo UNet at SD 1.5 shapes (orchestrator/models/echo.py, fp32 on the wire;
  Python backend, no compute). The other stages are answered in this process (zero text
  embeddings and images), so the jobs are real jobs (`start_job`, `plan`/`advance`, real
  scheduler steps on 4x64x64 latents at 512x512) and only the UNet goes to Triton;
- `micro`: the micro preset's real repository, every stage in Triton, as `orchestrator bench
  --no-kafka --presets micro --modes naive,step --workloads uniform` drives it (the encode_prompt
  calls behind the prompt-embedding cache, as there).

Runs are interleaved over `--rounds` so that the machine's drift hits every configuration alike:

    .venv/bin/python bench/unet_idle.py [--parts echo,micro] [--cohorts 1,2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as aioclient

from orchestrator.adapters.triton_pool import TritonPool
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.batcher import StepBatcher
from orchestrator.bench import closed_loop, ensure_models, make_requests
from orchestrator.config import load_settings
from orchestrator.core.batching import CohortPolicy, busy_time
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, start_job
from orchestrator.domain import GenerationRequest, ModelInfo, StageCall
from orchestrator.executor import StageRunner, run_job
from orchestrator.models import echo
from orchestrator.models.presets import SD15_SCHEDULER
from orchestrator.prompt_cache import prompt_cache_runner

Outputs = dict[str, npt.NDArray[Any]]
Send = Callable[[GenerationRequest], Any]

ECHO_SHAPE = "sd15"
ECHO_WIRE = "fp32"
ECHO_MODEL = echo.model_name(ECHO_SHAPE, ECHO_WIRE)


class UnetSpans:
    """A runner that records when each UNet call is in flight (start, end; monotonic)."""

    def __init__(self, inner: StageRunner, unet: str = UNET) -> None:
        self.inner = inner
        self.unet = unet
        self.spans: list[tuple[float, float]] = []

    async def infer(self, call: StageCall) -> Outputs:
        if call.model != self.unet:
            return await self.inner.infer(call)
        start = time.monotonic()
        try:
            return await self.inner.infer(call)
        finally:
            self.spans.append((start, time.monotonic()))


class EchoStages:
    """UNet calls to the echo UNet in Triton; encode_prompt and vae_decoder answered here."""

    def __init__(self, triton: StageRunner) -> None:
        self.triton = triton

    async def infer(self, call: StageCall) -> Outputs:
        rows = int(next(iter(call.inputs.values())).shape[0])
        if call.model == UNET:
            return await self.triton.infer(dataclasses.replace(call, model=ECHO_MODEL))
        await asyncio.sleep(0)
        if call.model == ENCODE_PROMPT:
            tokens, width = echo.SHAPES[ECHO_SHAPE].text
            return {
                "text_embeds": np.zeros((rows, tokens, width), np.float32),
                "num_tokens": np.full((rows, 1), 8, np.int64),
            }
        if call.model == VAE_DECODER:
            _, h, w = echo.SHAPES[ECHO_SHAPE].latent
            return {"image": np.zeros((rows, 3, h * 8, w * 8), np.float32)}
        raise ValueError(f"no echo for {call.model}")


def echo_info() -> ModelInfo:
    channels, h, _ = echo.SHAPES[ECHO_SHAPE].latent
    tokens, width = echo.SHAPES[ECHO_SHAPE].text
    return ModelInfo(
        latent_channels=channels,
        vae_scale_factor=8,
        scaling_factor=0.18215,
        size_multiple=8,
        default_height=h * 8,
        default_width=h * 8,
        text_max_length=tokens,
        text_embed_dim=width,
        scheduler_config=SD15_SCHEDULER,
        unet_max_batch_size=echo.DEFAULT_MAX_BATCH_SIZE,
    )


@dataclasses.dataclass
class Run:
    part: str
    mode: str
    round: int
    requests: int
    concurrency: int
    wall_s: float
    images_per_s: float
    unet_calls: int
    unet_rows_per_call: float
    #: Triton's side: sum of the UNet's execution times
    exec_s: float
    #: the orchestrator's side: time with at least one UNet call in flight
    in_flight_s: float
    #: from the first UNet call's start to the last one's end
    window_s: float
    failed: int

    @property
    def idle_triton(self) -> float:
        return max(0.0, 1.0 - self.exec_s / self.wall_s)

    @property
    def idle_orchestrator(self) -> float:
        return max(0.0, 1.0 - self.in_flight_s / self.wall_s)

    @property
    def gaps_triton(self) -> float:
        """Idle share between the first and the last UNet call (ramp-up and drain left out)."""
        return max(0.0, 1.0 - self.exec_s / self.window_s)

    @property
    def gaps_orchestrator(self) -> float:
        return max(0.0, 1.0 - self.in_flight_s / self.window_s)


async def unet_exec(url: str, model: str) -> tuple[float, int, int]:
    """(execution seconds, executions, rows) of `model` so far, from Triton's batch_stats."""
    async with aioclient.InferenceServerClient(url) as client:
        resp = await client.get_inference_statistics(model, as_json=True)
    (entry,) = resp["model_stats"]
    ns = count = rows = 0
    for b in entry.get("batch_stats", []):
        n = int(b.get("compute_infer", {}).get("count", 0))
        count += n
        rows += n * int(b["batch_size"])
        for key in ("compute_input", "compute_infer", "compute_output"):
            ns += int(b.get(key, {}).get("ns", 0))
    return ns / 1e9, count, rows


@asynccontextmanager
async def sender(
    part: str, mode: str, url: str, spans: UnetSpans, cohorts: int
) -> AsyncIterator[Send]:
    del url
    if part == "echo":
        info = echo_info()
        runner: StageRunner = spans
    else:
        assert isinstance(spans.inner, TritonPool)
        info = await spans.inner.model_info()
        runner = prompt_cache_runner(spans.inner, load_settings(None), inner=spans)
    if mode == "naive":

        async def send_naive(r: GenerationRequest) -> None:
            await run_job(start_job(r, info), runner)

        yield send_naive
        return
    max_rows = {m: info.max_rows(m) or 64 for m in (UNET, ENCODE_PROMPT, VAE_ENCODER, VAE_DECODER)}
    batcher = StepBatcher(runner, max_rows, cohorts=CohortPolicy(cohorts))

    async def send_step(r: GenerationRequest) -> None:
        async with batcher.job():
            await run_job(start_job(r, info), batcher)

    yield send_step


async def run_part(
    part: str, url: str, args: argparse.Namespace, modes: Sequence[tuple[str, int]]
) -> list[Run]:
    steps = args.echo_steps if part == "echo" else args.steps
    n = args.echo_requests if part == "echo" else args.requests
    model = ECHO_MODEL if part == "echo" else UNET
    out: list[Run] = []
    offset = 0
    async with TritonPool(url, timeout_s=args.timeout) as pool:
        inner: StageRunner = EchoStages(pool) if part == "echo" else pool
        for rnd in range(args.rounds):
            for mode, cohorts in modes:
                spans = UnetSpans(inner, UNET)
                label = mode if mode == "naive" else f"step/{cohorts}"
                async with sender(part, mode, url, spans, cohorts) as send:
                    warm = make_requests("uniform", args.warmup, steps, offset=10_000 + offset)
                    await closed_loop(warm, min(args.concurrency, len(warm)), send)
                    requests = make_requests("uniform", n, steps, offset)
                    offset += n
                    spans.spans.clear()
                    e0, c0, r0 = await unet_exec(url, model)
                    latencies, failed, wall = await closed_loop(requests, args.concurrency, send)
                    e1, c1, r1 = await unet_exec(url, model)
                run = Run(
                    part=part,
                    mode=label,
                    round=rnd,
                    requests=n,
                    concurrency=args.concurrency,
                    wall_s=wall,
                    images_per_s=len(latencies) / wall,
                    unet_calls=c1 - c0,
                    unet_rows_per_call=(r1 - r0) / max(1, c1 - c0),
                    exec_s=e1 - e0,
                    in_flight_s=busy_time(spans.spans),
                    window_s=max(e for _, e in spans.spans) - min(s for s, _ in spans.spans),
                    failed=failed,
                )
                print("  " + format_run(run), flush=True)
                out.append(run)
    return out


HEADER = (
    f"{'part':5} {'mode':7} {'rnd':>3} {'img/s':>7} {'wall s':>7} {'unet calls':>10} "
    f"{'rows/call':>9} {'exec s':>7} | idle of wall: {'triton':>6} {'orch':>6} "
    f"| between calls: {'triton':>6} {'orch':>6}"
)

METRICS = (
    "images_per_s",
    "wall_s",
    "unet_calls",
    "unet_rows_per_call",
    "exec_s",
    "idle_triton",
    "idle_orchestrator",
    "gaps_triton",
    "gaps_orchestrator",
)


def _cells(part: str, mode: str, rnd: str, m: dict[str, float]) -> str:
    return (
        f"{part:5} {mode:7} {rnd:>3} {m['images_per_s']:7.2f} {m['wall_s']:7.2f} "
        f"{m['unet_calls']:>10.0f} {m['unet_rows_per_call']:9.1f} {m['exec_s']:7.2f} "
        f"| {'':13} {m['idle_triton']:6.1%} {m['idle_orchestrator']:6.1%} "
        f"| {'':15} {m['gaps_triton']:6.1%} {m['gaps_orchestrator']:6.1%}"
    )


def format_run(r: Run) -> str:
    m = {k: float(getattr(r, k)) for k in METRICS}
    return _cells(r.part, r.mode, str(r.round), m) + (f"  FAILED {r.failed}" if r.failed else "")


def summary(runs: Sequence[Run]) -> list[str]:
    lines = [
        "",
        "medians over rounds (idle: 1 - UNet busy / wall; busy = Triton's execution time, or the "
        "orchestrator's time with a UNet call in flight; 'between calls': from the first UNet "
        "call's start to the last one's end)",
        HEADER,
    ]
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.part, r.mode), []).append(r)
    for (part, mode), rs in groups.items():
        med = {k: statistics.median(float(getattr(r, k)) for r in rs) for k in METRICS}
        line = _cells(part, mode, "med", med)
        naive = groups.get((part, "naive"))
        if naive and mode != "naive":
            base = statistics.median(r.images_per_s for r in naive)
            line += f"  step/naive {med['images_per_s'] / base:.2f}"
        lines.append(line)
    return lines


async def _main(args: argparse.Namespace) -> list[Run]:
    modes = [("naive", 1)] * ("naive" in args.modes) + [
        ("step", int(c)) for c in args.cohorts.split(",") if c.strip()
    ]
    runs: list[Run] = []
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        with tempfile.TemporaryDirectory(prefix="unet-idle-") as tmp:
            if part == "echo":
                repo = Path(tmp) / "repository"
                echo.write_repository(repo, [(ECHO_SHAPE, ECHO_WIRE)])
            elif part == "micro":
                repo = ensure_models("micro", args.out_dir)
            else:
                raise SystemExit(f"unknown part {part!r}")
            print(f"part {part}: tritonserver on {repo}", flush=True)
            print(HEADER, flush=True)
            with TritonServer(repo, work_dir=Path(tmp) / "tritonserver") as server:
                runs += await run_part(part, server.grpc_url, args, modes)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="echo,micro", help="echo, micro")
    p.add_argument("--cohorts", default="1,2", help="step mode runs, one per cohort count")
    p.add_argument("--modes", default="naive,step", help="naive,step (naive: the ratio's base)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="micro: requests per run")
    p.add_argument("--steps", type=int, default=4, help="micro: steps per request")
    p.add_argument("--echo-requests", type=int, default=64)
    p.add_argument("--echo-steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out-dir", type=Path, default=Path("build/bench"), help="micro models")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    print(
        f"unet idle bench: {os.cpu_count()} cores; concurrency {args.concurrency}; "
        f"{args.rounds} rounds; cohorts {args.cohorts}",
        flush=True,
    )
    runs = asyncio.run(_main(args))
    print("\n".join(summary(runs)))
    if args.json is not None:
        rows = [
            {
                **dataclasses.asdict(r),
                "idle_triton": r.idle_triton,
                "idle_orch": r.idle_orchestrator,
            }
            for r in runs
        ]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json), "out_dir": str(args.out_dir)},
                    "runs": rows,
                },
                indent=2,
            )
        )
    failed = sum(r.failed for r in runs)
    print(f"finished in {time.monotonic() - started:.0f} s; {failed} requests failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
