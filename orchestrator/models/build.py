"""`orchestrator models build`: presets or a local diffusers folder -> ONNX -> Triton repository.

Layout written under OUT (see docs/model-repository.md):

    OUT/diffusers/    presets only: random-weight components in the diffusers layout
    OUT/onnx/         text_encoder.onnx vae_encoder.onnx unet.onnx vae_decoder.onnx
    OUT/repository/   the Triton model repository for the target (cpu or gpu)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from orchestrator.models import export, presets, repository


class BuildError(Exception):
    """The build cannot run with the given arguments (bad source folder, bad preset)."""


#: Bump when the repository's contract changes (tensors, parameters, models), so that cached
#: builds (`orchestrator dev`, the benchmarks) are rebuilt instead of served stale.
#: 2: tokenizer/encode_prompt return num_tokens; pipeline_bls. 3: the unet declares max_width
#: and max_height; CPU stages hand back arena memory above ort_arena_keep_mb.
REPOSITORY_FORMAT = "3"
FORMAT_FILE = "orchestrator-format.txt"


def is_current(repo: Path) -> bool:
    """True when `repo` was written by a build of the current repository format."""
    stamp = repo / FORMAT_FILE
    return stamp.is_file() and stamp.read_text().strip() == REPOSITORY_FORMAT


def ensure_preset(preset: str, out: Path) -> Path:
    """OUT/repository for a preset, (re)built when missing or of an older format."""
    repo = out / "repository"
    if not is_current(repo):
        reason = "missing" if not repo.exists() else "from an older version"
        print(f"building the {preset} models into {out} ({reason}) ...", flush=True)
        build_models(preset=preset, source=None, out=out, target="cpu")
    return repo


def _source_label(preset: str | None, source: str | None) -> str:
    if preset is not None:
        return preset
    assert source is not None
    return str(Path(source).expanduser().resolve())


def build_models(
    preset: str | None,
    source: str | None,
    out: Path,
    target: str = "cpu",
    max_batch_size: int = 64,
    *,
    queue_delay_us: int = repository.DEFAULT_QUEUE_DELAY_US,
) -> Path:
    """Build ONNX files and the Triton repository; returns OUT/repository.

    Exactly one of `preset` ("tiny", "micro") and `source` (a diffusers model folder) is given.
    Raises BuildError for bad arguments or an unusable source folder.
    """
    if (preset is None) == (source is None):
        raise BuildError("give exactly one of a preset or a source folder")
    if target not in repository.TARGETS:
        raise BuildError(f"target must be one of {', '.join(repository.TARGETS)}, not {target!r}")
    if max_batch_size < 1:
        raise BuildError(f"max batch size must be at least 1, not {max_batch_size}")
    out = Path(out)
    preset_max_size: int | None = None
    if preset is not None:
        try:
            spec = presets.get_preset(preset)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        preset_max_size = spec.max_size
        model_dir = presets.save_preset(spec, out / "diffusers")
    else:
        assert source is not None
        model_dir = Path(source).expanduser()
        try:
            export.check_source(model_dir)
        except export.ModelSourceError as exc:
            raise BuildError(str(exc)) from exc

    try:
        components = export.load_components(model_dir)
    except export.ModelSourceError as exc:
        raise BuildError(str(exc)) from exc
    onnx_paths = export.export_all(components, out / "onnx")

    with tempfile.TemporaryDirectory() as tmp:
        # re-save the loaded tokenizer so the Triton model gets one normalized set of files
        tokenizer_dir = Path(tmp) / "tokenizer"
        components.tokenizer.save_pretrained(str(tokenizer_dir))
        for name in ("vocab.json", "merges.txt"):
            original = model_dir / "tokenizer" / name
            if original.is_file() and not (tokenizer_dir / name).exists():
                (tokenizer_dir / name).write_bytes(original.read_bytes())
        repo = out / "repository"
        repository.write_repository(
            repo,
            components.facts,
            onnx_paths,
            tokenizer_dir,
            target=target,
            max_batch_size=max_batch_size,
            source=_source_label(preset, source),
            queue_delay_us=queue_delay_us,
            limits=repository.serving_limits(components.facts, target, preset_max_size),
        )
    (repo / FORMAT_FILE).write_text(REPOSITORY_FORMAT + "\n")
    return repo


def run_build(
    preset: str | None, source: str | None, out: str | Path, target: str, max_batch_size: int
) -> int:
    """CLI entry: build, print what was written, return the exit code (2 on bad input)."""
    started = time.monotonic()
    out_path = Path(out)
    try:
        repo = build_models(preset, source, out_path, target, max_batch_size)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    if preset is not None:
        print(f"diffusers components: {out_path / 'diffusers'}")
    for stage in export.STAGES:
        path = out_path / "onnx" / f"{stage}.onnx"
        print(f"onnx {stage}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"triton repository ({target}): {repo}")
    for name in repository.MODEL_NAMES:
        print(f"  {name}: {repo / name / 'config.pbtxt'}")
    limits = repository.read_limits(repo)
    if limits is not None:
        print(
            f"serves images up to {limits.max_width}x{limits.max_height} and {max_batch_size} "
            "rows per call (unet parameters max_width/max_height, max_batch_size)"
        )
    if target == "gpu":
        print(f"  convert with: bash {repo / 'convert.sh'} (trtexec, inside the NGC container)")
    print(f"built in {elapsed:.1f} s")
    return 0
