"""Command line: wiring only. Each subcommand delegates to the module that owns the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_models(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models":
        from orchestrator.models.build import run_build

        return run_build(
            preset=args.preset,
            source=args.source,
            out=args.out,
            target=args.target,
            max_batch_size=args.max_batch_size,
        )
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
