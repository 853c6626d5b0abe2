"""Command line: wiring only. Each subcommand delegates to the module that owns the work."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.core.schedulers import ALIASES
from orchestrator.domain import GenerationRequest, Priority
from orchestrator.errors import OrchestratorError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="build stage models and the Triton model repository")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="build (or convert) models and write a Triton repository")
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["tiny", "micro"], help="random-weight preset")
    src.add_argument("--from", dest="source", help="local diffusers model folder (e.g. SD 1.5)")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    build.add_argument("--max-batch-size", type=int, default=64)


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """The request flags, named the same in every command that takes a request."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--scheduler",
        default="pndm",
        help=f"alias ({', '.join(ALIASES)}) or a diffusers scheduler class name",
    )
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--init-image", type=Path, default=None, help="image file for img2img")
    p.add_argument("--strength", type=float, default=0.8, help="img2img strength in (0, 1]")
    p.add_argument("--out", type=Path, required=True, help="PNG path (x.png, x-1.png, ...)")


def request_from_args(args: argparse.Namespace, request_id: str = "") -> GenerationRequest:
    init = None
    if args.init_image is not None:
        init = Path(args.init_image).read_bytes()
    return GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        init_image=init,
        strength=args.strength,
        request_id=request_id,
        # submit's own flags; absent in commands without them (generate)
        priority=getattr(args, "priority", "normal"),
        preview=getattr(args, "preview_dir", None) is not None,
        deadline=(
            None
            if getattr(args, "deadline_s", None) is None
            else time.time() + float(args.deadline_s)
        ),
    )


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = sub.add_parser("generate", help="one image against a running Triton, no Kafka")
    gen.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    gen.add_argument("--timeout", type=float, default=60.0, help="deadline of each model call (s)")
    add_request_arguments(gen)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="consume requests from Kafka and answer them")
    serve.add_argument("--env-file", default=None, help="settings file (ORCHESTRATOR_* lines)")
    serve.add_argument(
        "--role",
        choices=["all", "encode", "denoise", "decode"],
        default=None,
        help="the stages this process runs (default: the role setting, all)",
    )


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="embedded stack: Tansu + tritonserver + the service")
    dev.add_argument("--models-dir", type=Path, default=Path("build/models/tiny"))
    dev.add_argument("--preset", choices=["tiny", "micro"], default="tiny")
    dev.add_argument("--work-dir", type=Path, default=Path("build/dev"))
    dev.add_argument("--kafka-port", type=int, default=9092)
    dev.add_argument("--grpc-port", type=int, default=8001)
    dev.add_argument("--http-port", type=int, default=8000)
    dev.add_argument("--metrics-port", type=int, default=8002)
    dev.add_argument(
        "--service-http-port", type=int, default=None, help="default: the http_port setting"
    )
    dev.add_argument("--partitions", type=int, default=4)
    dev.add_argument("--gateway-port", type=int, default=8080, help="the HTTP gateway's port")
    dev.add_argument("--env-file", default=None, help="settings file (ORCHESTRATOR_* lines)")


def _add_submit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = sub.add_parser("submit", help="send one request through Kafka and wait for it")
    submit.add_argument("--bootstrap-servers", default=None, help="default: from settings")
    submit.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    submit.add_argument("--request-id", default="", help="idempotency key (default: random)")
    submit.add_argument("--env-file", default=None, help="settings file (ORCHESTRATOR_* lines)")
    submit.add_argument(
        "--priority", choices=[p.value for p in Priority], default=Priority.NORMAL.value
    )
    submit.add_argument(
        "--deadline-s", type=float, default=None, help="answer deadline_exceeded if not done in S s"
    )
    submit.add_argument(
        "--preview-dir", type=Path, default=None, help="ask for previews and write them here"
    )
    submit.add_argument(
        "--cancel-timeout",
        type=float,
        default=30.0,
        help="after Ctrl-C, seconds to wait for the cancelled answer (Ctrl-C again: quit now)",
    )
    add_request_arguments(submit)


def _add_cancel_watch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cancel = sub.add_parser("cancel", help="cancel a request by id (through the control topic)")
    cancel.add_argument("request_id", metavar="REQUEST_ID")
    cancel.add_argument("--reason", default=None, help="carried by the cancel and its event")
    cancel.add_argument("--wait", action="store_true", help="wait for the request's answer")
    cancel.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits")
    watch = sub.add_parser("watch", help="print a request's progress events until it ends")
    watch.add_argument("request_id", metavar="REQUEST_ID")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument("--timeout", type=float, default=0.0, help="seconds (default: no limit)")
    for p in (cancel, watch):
        p.add_argument("--bootstrap-servers", default=None, help="default: from settings")
        p.add_argument("--env-file", default=None, help="settings file (ORCHESTRATOR_* lines)")


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from orchestrator.bench import add_bench_arguments

    bench = sub.add_parser("bench", help="step batching vs naive calls vs a pure-Triton BLS model")
    add_bench_arguments(bench)


def _add_gateway(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = sub.add_parser("gateway", help="the HTTP gateway (ORCHESTRATOR_GATEWAY_* settings)")
    gateway.add_argument("--host", default=None, help="default: 127.0.0.1 (the host setting)")
    gateway.add_argument("--port", type=int, default=None, help="default: 8080 (the port setting)")
    gateway.add_argument("--env-file", default=None, help="settings file (ORCHESTRATOR_* lines)")
    gateway.add_argument(
        "--workers",
        type=int,
        default=None,
        help="gateway processes on the one port, about one per core (default: 1, the workers "
        "setting); see docs/gateway.md",
    )
    # internal: one worker of a `--workers N` gateway (binds its socket with SO_REUSEPORT)
    gateway.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=None,
        help="overrides the log_level setting (ORCHESTRATOR_LOG_LEVEL; default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_models(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_dev(sub)
    _add_submit(sub)
    _add_cancel_watch(sub)
    _add_bench(sub)
    _add_gateway(sub)
    return parser


class SettingsError(Exception):
    """The settings cannot be loaded; the message says which field or file."""


def _settings(args: argparse.Namespace) -> Settings:
    """The settings of every command: ORCHESTRATOR_* variables, the command's `--env-file`,
    then its flags (`--bootstrap-servers`). Raises SettingsError naming what is wrong."""
    from pydantic import ValidationError

    from orchestrator.config import load_settings

    env_file = getattr(args, "env_file", None)
    if env_file is not None and not Path(env_file).is_file():
        raise SettingsError(f"--env-file {env_file}: no such file")
    overrides: dict[str, object] = {}
    if getattr(args, "bootstrap_servers", None):
        overrides["bootstrap_servers"] = args.bootstrap_servers
    if getattr(args, "role", None):
        overrides["role"] = args.role
    try:
        return load_settings(env_file, **overrides)
    except ValidationError as exc:
        source = f" (from the environment and {env_file})" if env_file else ""
        raise SettingsError(f"invalid settings{source}: {exc}") from exc


async def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.client_cli import run_submit

    return await run_submit(args, settings, request_from_args(args, request_id=args.request_id))


async def _generate(args: argparse.Namespace) -> int:
    from orchestrator.adapters.triton import TritonClient
    from orchestrator.core.pipeline import start_job
    from orchestrator.executor import run_job
    from orchestrator.imagefile import encode_png, output_paths

    request = request_from_args(args)
    async with TritonClient(args.triton_url, timeout_s=args.timeout) as client:
        info = await client.model_info()
        job = start_job(request, info)
        result = await run_job(job, client)
    paths = output_paths(args.out, len(result.images))
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image))
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from orchestrator.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, args.log_level)
    if args.command == "models":
        from orchestrator.models.build import run_build

        code: int = run_build(
            preset=args.preset,
            source=args.source,
            out=args.out,
            target=args.target,
            max_batch_size=args.max_batch_size,
        )
        return code
    if args.command == "serve":
        from orchestrator.service import serve

        asyncio.run(serve(settings))
        return 0
    if args.command == "dev":
        from orchestrator.dev import DevStack, run_dev

        stack = DevStack(
            models_dir=args.models_dir,
            preset=args.preset,
            work_dir=args.work_dir,
            kafka_port=args.kafka_port,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            partitions=args.partitions,
            service_http_port=args.service_http_port,
            gateway_port=args.gateway_port,
        )
        return asyncio.run(run_dev(stack, settings))
    if args.command == "submit":
        return asyncio.run(_submit(args, settings))
    if args.command in ("cancel", "watch"):
        from orchestrator.client_cli import run_cancel, run_watch

        run = run_cancel if args.command == "cancel" else run_watch
        return asyncio.run(run(args, settings))
    if args.command == "generate":
        try:
            return asyncio.run(_generate(args))
        except OrchestratorError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    if args.command == "gateway":
        from orchestrator.gateway.server import serve_command

        return serve_command(
            settings,
            host=args.host,
            port=args.port,
            workers=args.workers,
            worker=args.worker,
            cli_prefix=["--log-level", args.log_level] if args.log_level else [],
            cli_args=["--env-file", args.env_file] if args.env_file else [],
        )
    if args.command == "bench":
        from orchestrator.bench import run_bench

        return run_bench(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
