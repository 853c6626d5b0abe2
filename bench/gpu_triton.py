"""The GPU path through the real Triton: SD-1.5-shaped stages served by tritonserver, driven by
the orchestrator's executor and StepBatcher over gRPC (issue 9).

One command builds random-weight SD-1.5-shaped components (the builders of
bench/gpu_step_batching.py), saves them in the diffusers layout, writes the model repository with
the project's generator (`write_repository(..., torch_folder=...)`: every stage a Python-backend
model running torch, dynamic batching on; target "gpu": KIND_GPU, fp16 on the wire and in the
model; target "cpu": fp32), starts the real tritonserver from the nvidia-pytriton wheel and runs:

- naive: one gRPC call per job per model call; Triton's dynamic batcher merges concurrent ones;
- step:  the orchestrator's StepBatcher merges the UNet calls of jobs at different steps;
- bls:   one gRPC call per image to `pipeline_bls`, which runs the whole pipeline inside Triton;

20 ddim steps, guidance 7.5 (2 UNet rows per job), unique prompts (the prompt-embedding cache
misses), closed loop at each concurrency. It reports throughput, p50/p95 per request and per stage
(the executor's own timings: text encoding, the UNet calls of sampling, decoding), rows per UNet
execution from Triton's statistics, Triton compute per call beside the transport (gRPC +
Python-backend IPC) per call and the bytes each call moves, the seed's targets, and the parity of
a few images against the same pipeline run in process by torch in fp32 on the same device.

    python bench/gpu_triton.py --tokenizer DIR [--device cuda|cpu] [--json OUT.json]

On a machine without a GPU it runs tiny models on the CPU (`--small` is implied): the smoke test.
`--budget-s` stops starting new runs past that many seconds (what ran is still reported).
`--stub-path DIR` goes first on the Python-backend stubs' sys.path (through a venv of the
script's own, `stub_environment`): tritonserver 2.51's stub returns empty output tensors with
numpy 2, so a GPU machine whose torch comes with numpy 2 gives the stubs a numpy 1.26 there (see
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's orchestrator

from gpu_step_batching import sd15_components

from orchestrator.bench import (
    RpcTimer,
    closed_loop,
    direct_sender,
    job_calls,
    make_requests,
    read_stats,
    stats_delta,
    summarize,
)
from orchestrator.domain import GenerationRequest

MODES = ("naive", "step", "bls")
#: the seed's per-stage p95 targets, ms (latent encoding is img2img only: not in this workload)
TARGETS_MS = {"encode_prompt": 1000.0, "unet": 2000.0, "vae_decoder": 500.0, "total": 5000.0}
TARGET_NAMES = {
    "encode_prompt": "text encoding",
    "unet": "sampling (UNet calls)",
    "vae_decoder": "decoding",
    "total": "total",
}
#: the seed's throughput claim, requests per second per GPU
THROUGHPUT_CLAIM = (10.0, 20.0)
STAT_MODELS = ("text_encoder", "vae_encoder", "unet", "vae_decoder", "pipeline_bls")


def environment_facts(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            facts["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            facts["nvidia_smi"] = f"unavailable: {exc}"
    return facts


def build_models(folder: Path, tokenizer: Path, small: bool, device: str) -> Path:
    """Random-weight components saved in the diffusers layout (fp16 weights for the GPU)."""
    import torch

    from orchestrator.models.presets import SD15_SCHEDULER, save_components

    with torch.device(device):  # initialise on the GPU: minutes faster at SD-1.5 size
        text, unet, vae = sd15_components(small)
    if device == "cuda":
        text, unet, vae = text.half(), unet.half(), vae.half()
    save_components(folder, unet, vae, text, SD15_SCHEDULER, tokenizer_dir=tokenizer)
    del text, unet, vae
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_repo(folder: Path, repo: Path, target: str, facts: Any) -> None:
    from orchestrator.models.repository import serving_limits, write_repository

    write_repository(
        repo,
        facts,
        {},
        folder / "tokenizer",
        target=target,
        max_batch_size=64,
        source="gpu_triton random weights",
        limits=serving_limits(facts, "cpu"),  # the native size: 512x512 at SD-1.5 shape
        torch_folder=folder,
    )


def stub_environment(work: Path, stub_path: str | None) -> dict[str, str]:
    """Environment for tritonserver whose Python-backend stubs see our packages.

    The stubs ignore PYTHONPATH (their embedded interpreter does not read it: seen with the
    3.12 stub, sys.path lacked the PYTHONPATH entry) and take the site-packages of the venv
    whose python3 is first on PATH. So a venv of our own on this interpreter's base lists, in a
    .pth: `stub_path` first (numpy 1.26 on a machine whose torch has numpy 2), then PYTHONPATH's
    entries (wheels carried to a machine without them), then this interpreter's site-packages
    (torch), the last two as site dirs so that their own .pth files apply."""
    import venv

    target = work / "stub-venv"
    if not (target / "pyvenv.cfg").is_file():
        venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    base = {"base": str(target), "platbase": str(target)}
    site_dir = Path(sysconfig.get_paths(vars=base)["purelib"])
    dirs = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = sysconfig.get_paths()
    dirs += list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    lines = [str(Path(stub_path).resolve())] if stub_path else []
    lines += [f"import site; site.addsitedir({str(Path(d).resolve())!r})" for d in dirs]
    pth = site_dir / "_gpu_triton.pth"
    pth.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if stub_path:
        # Packages built against numpy 2 fail to import under the stubs' numpy 1.26, and
        # transformers imports some of them when installed (sklearn from its generation code:
        # seen on an H100 machine, where `from transformers import AutoModel` then failed in
        # every stub). Hide those from the stubs, as if not installed: find_spec answers None
        # for a name bound to None in sys.modules, which is how transformers and diffusers
        # decide what is available.
        hidden = failing_imports(target / "bin" / "python3", OPTIONAL_IMPORTS)
        if hidden:
            print(f"hidden from the stubs (fail to import with their numpy): {hidden}", flush=True)
            lines.append(f"import sys; sys.modules.update(dict.fromkeys({hidden!r}))")
            pth.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "PATH": os.pathsep.join([str(target / "bin"), os.environ.get("PATH", "")]),
        "VIRTUAL_ENV": str(target),
    }


# optional packages transformers, diffusers or peft import when installed; none is needed here
OPTIONAL_IMPORTS = (
    "sklearn", "scipy", "pandas", "cv2", "numba", "matplotlib", "torchvision", "torchaudio",
    "timm", "onnxruntime", "onnx", "onnxscript", "sentencepiece", "tiktoken", "accelerate", "peft",
)  # fmt: skip


def failing_imports(python: Path, names: tuple[str, ...]) -> list[str]:
    """The names that `python` cannot import, each tried in a fresh interpreter."""
    probe = (
        "import importlib, sys\n"
        "try:\n    importlib.import_module(sys.argv[1])\n"
        "except ModuleNotFoundError as e:\n"  # not installed: nothing to hide
        "    sys.exit(0 if e.name == sys.argv[1] else 3)\n"
        "except BaseException:\n    sys.exit(3)\n"
    )
    from concurrent.futures import ThreadPoolExecutor

    def fails(name: str) -> bool:
        run = subprocess.run([str(python), "-c", probe, name], capture_output=True, timeout=300)
        return run.returncode != 0

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [name for name, bad in zip(names, pool.map(fails, names), strict=True) if bad]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values, dtype=np.float64), q)) if values else float("nan")


def unique_requests(n: int, steps: int, offset: int) -> list[GenerationRequest]:
    return [
        dataclasses.replace(r, prompt=f"a photo of object {i + offset}, studio light")
        for i, r in enumerate(make_requests("uniform", n, steps, offset))
    ]


async def run_mode(
    mode: str,
    grpc_url: str,
    http_url: str,
    args: argparse.Namespace,
    info: Any,
    started: float,
) -> list[dict[str, Any]]:
    timer = RpcTimer()
    rows: list[dict[str, Any]] = []
    offset = {"naive": 0, "step": 100_000, "bls": 200_000}[mode]
    async with direct_sender(mode, grpc_url, args.timeout, timer) as send:
        warm = unique_requests(args.warmup, 2, offset + 90_000)
        if warm:
            await closed_loop(warm, len(warm), send)
        for c in [int(x) for x in args.concurrency.split(",")]:
            if time.monotonic() - started > args.budget_s:
                print(
                    f"  {mode} c={c}: skipped (past --budget-s {args.budget_s:.0f} s)", flush=True
                )
                continue
            n = args.requests or max(2 * c, 4)
            requests = unique_requests(n, args.steps, offset)
            offset += n
            answers: dict[str, Any] = {}

            async def timed(r: GenerationRequest, answers: dict[str, Any] = answers) -> None:
                answers[r.request_id] = await send(r)

            before = read_stats([http_url])
            rpc_before = timer.busy_s
            by_model_before = json.loads(json.dumps(timer.by_model))
            latencies, failed, wall = await closed_loop(requests, c, timed)
            delta = stats_delta(before, read_stats([http_url]))
            result = summarize(
                preset="sd15" if not args.small else "small",
                path="grpc" if mode == "bls" else "direct",
                mode=mode,
                workload="uniform",
                concurrency=c,
                latencies=latencies,
                failed=failed,
                wall_s=wall,
                calls=job_calls(requests, info),
                delta=delta,
                rpc_s=timer.busy_s - rpc_before,
            )
            row = dataclasses.asdict(result)
            stage: dict[str, list[float]] = {k: [] for k in TARGETS_MS}
            for out in answers.values():
                timings = getattr(out, "timings_ms", None)
                if timings:
                    for k in TARGETS_MS:
                        stage[k].append(float(timings.get(k, 0.0)))
            row["stage_p50_ms"] = {k: percentile(v, 50) for k, v in stage.items() if v}
            row["stage_p95_ms"] = {k: percentile(v, 95) for k, v in stage.items() if v}
            row["triton"] = {
                m: {
                    **d,
                    "compute_ms_per_execution": d["compute_ns"] / d["execution_count"] / 1e6
                    if d.get("execution_count")
                    else None,
                    "rows_per_execution": d["inference_count"] / d["execution_count"]
                    if d.get("execution_count")
                    else None,
                }
                for m, d in delta.items()
                if m in STAT_MODELS and d.get("execution_count")
            }
            row["wire"] = wire_per_call(timer.by_model, by_model_before, half=args.half_wire)
            rows.append(row)
            print("  " + format_row(row), flush=True)
    return rows


def wire_per_call(
    now: dict[str, dict[str, int]], before: dict[str, dict[str, int]], *, half: bool
) -> dict[str, dict[str, float]]:
    """Per model over one run: calls and MB per call on the wire (both ways; float tensors
    other than timestep in half precision where the models declare fp16)."""
    out = {}
    for model, counts in now.items():
        d = {k: v - before.get(model, {}).get(k, 0) for k, v in counts.items()}
        if d["calls"] <= 0:
            continue
        wire = d["bytes_in"] + d["bytes_out"] - (d["fp32_bytes"] // 2 if half else 0)
        out[model] = {"calls": d["calls"], "mb_per_call": wire / 1e6 / d["calls"]}
    return out


HEADER = (
    f"{'mode':>5} {'conc':>4} {'n':>4} {'img/s':>6} {'p50 ms':>8} {'p95 ms':>8} "
    f"{'text p95':>8} {'unet p95':>8} {'dec p95':>8} {'unet rows':>9} {'compute':>8} "
    f"{'rpc':>7} {'MB/unet':>7}"
)


def per_call(r: dict[str, Any], key: str, width: int, digits: int) -> str:
    """A per-job-call figure; none for BLS (one gRPC call per image, its stage calls inside)."""
    if r["mode"] == "bls":
        return "-".rjust(width)
    return f"{r[key]:{width}.{digits}f}"


def format_row(r: dict[str, Any]) -> str:
    s95 = r.get("stage_p95_ms", {})
    unet_wire = r.get("wire", {}).get("unet", {})

    def ms(v: float | None) -> str:
        return "-" if v is None or v != v else f"{v:.0f}"

    n = r["requests"] - r["failed"]
    return (
        f"{r['mode']:>5} {r['concurrency']:>4} {n if not r['failed'] else str(n) + '!':>4} "
        f"{r['throughput']:6.2f} {r['p50_ms']:8.0f} {r['p95_ms']:8.0f} "
        f"{ms(s95.get('encode_prompt')):>8} {ms(s95.get('unet')):>8} "
        f"{ms(s95.get('vae_decoder')):>8} {r['unet_batch']:9.1f} "
        f"{per_call(r, 'compute_ms_per_call', 8, 1)} {per_call(r, 'transport_ms_per_call', 7, 2)} "
        f"{unet_wire.get('mb_per_call', float('nan')):7.2f}"
    )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: the highest concurrency whose stage and total p95 all meet the seed's targets,
    with its throughput against the claim."""
    out = []
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["concurrency"])
        meeting = [
            r
            for r in mine
            if r["failed"] == 0
            and r["p95_ms"] < TARGETS_MS["total"]
            and all(v < TARGETS_MS[k] for k, v in r.get("stage_p95_ms", {}).items())
        ]
        if not mine:
            continue
        best = meeting[-1] if meeting else None
        out.append(
            {
                "mode": mode,
                "concurrency_meeting_targets": best["concurrency"] if best else None,
                "throughput_there": best["throughput"] if best else None,
                "stage_p95_ms_there": best.get("stage_p95_ms") if best else None,
                "p95_ms_there": best["p95_ms"] if best else None,
                "max_throughput": max(r["throughput"] for r in mine),
            }
        )
    return out


async def parity(
    grpc_url: str, components: Any, device: str, n: int, steps: int
) -> list[dict[str, Any]]:
    """Images from Triton (naive path) against the same pipeline run in process by torch in
    fp32 on `device` with the same (saved) weights."""
    import torch

    from orchestrator.adapters.triton_pool import TritonPool
    from orchestrator.core.pipeline import start_job
    from orchestrator.executor import run_job
    from orchestrator.testing import TorchStageRunner

    c = components
    reference = TorchStageRunner(
        c.tokenizer, c.text_encoder, c.vae, c.unet, device=device, dtype=torch.float32
    )
    out = []
    async with TritonPool(grpc_url, timeout_s=600) as triton:
        info = await triton.model_info()
        for r in unique_requests(n, steps, 300_000):
            served = (await run_job(start_job(r, info), triton)).images[0].astype(np.int16)
            ref = (await run_job(start_job(r, info), reference)).images[0].astype(np.int16)
            diff = np.abs(served - ref)
            out.append(
                {
                    "seed": r.seed,
                    "max_abs_diff_255": int(diff.max()),
                    "mean_abs_diff_255": float(diff.mean()),
                    "share_over_2_255": float((diff > 2).mean()),
                    "served_std": float(served.std()),
                }
            )
    del reference
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def start_server(repo: Path, work_dir: Path, env: dict[str, str]) -> Any:
    from orchestrator.adapters.triton_server import TritonServer

    server = TritonServer(repo, work_dir=work_dir, env=env, startup_timeout=600.0)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def start_server_on(
    repo: Path, work: Path, stub_path: str | None, target: str, payload: dict[str, Any]
) -> Any:
    """tritonserver on the repository as generated; should KIND_GPU instances fail to load
    (a server that sees no GPU), once more with KIND_CPU instances: the torch stage models
    still run on the GPU (their `torch_device` parameter), and the payload says so."""
    from orchestrator.adapters.triton_server import TritonServerError

    env = stub_environment(work, stub_path)
    t0 = time.monotonic()
    try:
        server = start_server(repo, work / "server", env)
    except TritonServerError as exc:
        if target != "gpu":
            raise
        payload["kind_gpu_error"] = str(exc)[-4000:]
        print(f"KIND_GPU failed, retrying with KIND_CPU instances: {exc}", flush=True)
        for config in repo.glob("*/config.pbtxt"):
            text = config.read_text(encoding="utf-8")
            config.write_text(text.replace("kind: KIND_GPU", "kind: KIND_CPU"), encoding="utf-8")
        server = start_server(repo, work / "server-kind-cpu", env)
    payload["server_start_s"] = time.monotonic() - t0
    return server


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a CLIP tokenizer folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--small", action="store_true", help="tiny models (implied on the CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--requests", type=int, default=0, help="per run (0: 2 x conc, >= 4)")
    parser.add_argument("--warmup", type=int, default=4, help="2-step requests per mode")
    parser.add_argument("--parity", type=int, default=2, help="requests compared in fp32")
    parser.add_argument("--work-dir", type=Path, default=Path("build/gpu_triton"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=1e9)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--stub-path", default=None, help="first on the stubs' sys.path")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.small = args.small or device == "cpu"
    target = "gpu" if device == "cuda" else "cpu"
    args.half_wire = target == "gpu"  # the generator's GPU configs declare fp16 tensors
    env = environment_facts(device)
    print(json.dumps(env), flush=True)
    if int(np.__version__.split(".")[0]) >= 2 and not args.stub_path:
        print(
            "warning: numpy 2 here and no --stub-path: tritonserver 2.51's Python-backend stub "
            "answers empty tensors under numpy 2; give the stubs a numpy 1.26 (--stub-path)",
            flush=True,
        )
    work = args.work_dir.resolve()
    folder = build_models(work / "diffusers", args.tokenizer, args.small, device)
    from orchestrator.models.export import load_components

    components = load_components(folder)  # fp32: the facts, and the parity reference
    facts = components.facts
    repo = work / "repository"
    write_repo(folder, repo, target, facts)
    print(f"models built and repository written in {time.monotonic() - started:.0f} s", flush=True)
    payload: dict[str, Any] = {
        "environment": env,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    rows: list[dict[str, Any]] = []
    payload["results"] = rows
    server: Any = None
    try:
        server = start_server_on(repo, work, args.stub_path, target, payload)
        payload["environment"]["tritonserver"] = get_json(f"http://{server.http_url}/v2").get(
            "version"
        )
        print(
            f"tritonserver {payload['environment']['tritonserver']} ready in "
            f"{payload['server_start_s']:.0f} s",
            flush=True,
        )
        info = asyncio.run(model_info(server.grpc_url))
        print(HEADER, flush=True)
        for mode in [m for m in args.modes.split(",") if m]:
            try:
                rows += asyncio.run(
                    run_mode(mode, server.grpc_url, server.http_url, args, info, started)
                )
            except Exception as exc:  # one mode failing must not lose the others
                payload.setdefault("errors", {})[mode] = f"{type(exc).__name__}: {exc}"
                print(f"  {mode} failed: {type(exc).__name__}: {exc}", flush=True)
        payload["targets"] = targets(rows)
        if args.parity:
            payload["parity"] = asyncio.run(
                parity(server.grpc_url, components, device, args.parity, args.steps)
            )
    finally:
        if server is not None:
            payload["server_exit"] = server.stop()
            payload["server_log_tail"] = server.log_tail(40)
        payload["elapsed_s"] = time.monotonic() - started
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    report(payload)
    return 1 if any(r["failed"] for r in rows) or payload.get("errors") else 0


def get_json(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


async def model_info(grpc_url: str) -> Any:
    from orchestrator.adapters.triton_pool import TritonPool

    async with TritonPool(grpc_url) as triton:
        return await triton.model_info()


def report(payload: dict[str, Any]) -> None:
    rows = payload.get("results", [])
    env = payload["environment"]
    print()
    print(
        f"{env.get('gpu', 'CPU')} | tritonserver {env.get('tritonserver')} | torch {env['torch']}"
        f" | {payload['elapsed_s']:.0f} s"
    )
    print(HEADER)
    for r in rows:
        print(format_row(r))
    print(
        "stage p95 = the executor's time in that stage's calls per request (unet: the sum of a "
        "job's UNet calls); unet rows = Triton's inference_count / execution_count; compute = "
        "Triton compute per job call, ms; rpc = gRPC + Python-backend IPC per job call, ms (rpc "
        "wall - Triton compute - queue); MB/unet = tensor bytes per UNet call, both ways"
    )
    for t in payload.get("targets", []):
        claim = f"claim {THROUGHPUT_CLAIM[0]:.0f}-{THROUGHPUT_CLAIM[1]:.0f} req/s"
        if t["concurrency_meeting_targets"] is None:
            print(
                f"targets {t['mode']}: no concurrency meets every p95 target; max "
                f"{t['max_throughput']:.2f} img/s ({claim})"
            )
        else:
            print(
                f"targets {t['mode']}: met up to concurrency {t['concurrency_meeting_targets']}"
                f" at {t['throughput_there']:.2f} img/s ({claim})"
            )
    for p in payload.get("parity", []):
        print(
            f"parity seed {p['seed']}: max |diff| {p['max_abs_diff_255']}/255, mean "
            f"{p['mean_abs_diff_255']:.3f}/255, {100 * p['share_over_2_255']:.2f}% over 2/255"
        )


if __name__ == "__main__":
    sys.exit(main())
