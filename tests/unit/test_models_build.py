"""`orchestrator models build`: presets, ONNX parity with PyTorch, Triton repository files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from orchestrator.models import export, repository
from orchestrator.models.build import BuildError, build_models, run_build

TEMPLATES = Path(__file__).resolve().parents[2] / "triton_models"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outs = {}
    for preset in ("tiny", "micro"):
        out = tmp_path_factory.mktemp(f"build-{preset}")
        build_models(preset, None, out)
        outs[preset] = out
    return outs


@pytest.fixture(scope="module")
def components(built: dict[str, Path]) -> dict[str, export.Components]:
    return {name: export.load_components(out / "diffusers") for name, out in built.items()}


def parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def params(config: Any) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def load_template(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tpl_{name}", TEMPLATES / name / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["tiny", "micro"])
def test_layout(built: dict[str, Path], preset: str) -> None:
    out = built[preset]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "diffusers" / sub).is_dir()
    assert (out / "diffusers" / "model_index.json").is_file()
    for stage in export.STAGES:
        assert (out / "onnx" / f"{stage}.onnx").is_file()
    repo = out / "repository"
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(repository.MODEL_NAMES)
    assert sorted(p.name for p in repo.iterdir() if p.is_file()) == ["orchestrator-format.txt"]
    for stage in export.STAGES:
        assert (repo / stage / "1" / "model.onnx").read_bytes() == (
            out / "onnx" / f"{stage}.onnx"
        ).read_bytes()
        assert (repo / stage / "1" / "model.py").is_file()
    assert (repo / "tokenizer" / "1" / "model.py").is_file()
    assert (repo / "tokenizer" / "1" / "tokenizer" / "tokenizer_config.json").is_file()
    assert (repo / "encode_prompt" / "1").is_dir()


@pytest.mark.parametrize(
    ("preset", "size", "multiple", "factor", "dim", "max_size"),
    [("tiny", 64, 8, 4, 64, 128), ("micro", 32, 4, 2, 32, 64)],
)
def test_config_parameters(
    built: dict[str, Path],
    preset: str,
    size: int,
    multiple: int,
    factor: int,
    dim: int,
    max_size: int,
) -> None:
    repo = built[preset] / "repository"
    configs = {name: parse_config(repo / name / "config.pbtxt") for name in repository.MODEL_NAMES}
    for name, config in configs.items():
        assert config.name == name
        # the conditioning cache takes calls the batcher merged: no batch dimension of Triton's
        assert config.max_batch_size == (0 if name == repository.COND_CACHE_MODEL else 64)
        assert params(config)["source"] == preset
    unet = params(configs["unet"])
    assert unet["latent_channels"] == "4"
    assert unet["sample_size"] == "16"
    assert unet["size_multiple"] == str(multiple)
    assert unet["default_height"] == unet["default_width"] == str(size)
    assert unet["text_max_length"] == "77"
    assert unet["text_embed_dim"] == str(dim)
    # the sizes the preset was measured to serve (docs/model-repository.md)
    assert unet["max_width"] == unet["max_height"] == str(max_size)
    assert params(configs["pipeline_bls"])["max_width"] == str(max_size)
    assert repository.read_limits(repo) == repository.ServingLimits(max_size, max_size)
    for stage in export.STAGES:
        keep = params(configs[stage])["ort_arena_keep_mb"]
        assert keep == str(repository.DEFAULT_ARENA_KEEP_MB)
    assert unet["vae_scale_factor"] == str(factor)
    assert float(unet["scaling_factor"]) == pytest.approx(0.18215)
    scheduler = json.loads(unet["scheduler_config"])
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["skip_prk_steps"] is True and scheduler["steps_offset"] == 1
    for name in ("vae_encoder", "vae_decoder"):
        assert params(configs[name])["vae_scale_factor"] == str(factor)
        assert float(params(configs[name])["scaling_factor"]) == pytest.approx(0.18215)

    assert configs["unet"].backend == "python"
    assert configs["unet"].dynamic_batching.max_queue_delay_microseconds > 0
    assert configs["unet"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    tensors = {t.name: (t.data_type, list(t.dims)) for t in configs["unet"].input}
    fp32 = model_config_pb2.TYPE_FP32
    assert tensors == {
        "sample": (fp32, [4, -1, -1]),
        "timestep": (fp32, [1]),
        "encoder_hidden_states": (fp32, [77, dim]),
    }
    assert [(t.name, list(t.dims)) for t in configs["text_encoder"].output] == [
        ("text_embeds", [77, dim])
    ]
    tokenizer_in = configs["tokenizer"].input[0]
    assert (tokenizer_in.name, tokenizer_in.data_type) == ("prompt", model_config_pb2.TYPE_STRING)
    assert configs["tokenizer"].output[0].data_type == model_config_pb2.TYPE_INT64
    ensemble = configs["encode_prompt"]
    assert ensemble.platform == "ensemble"
    steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
    assert steps == ["tokenizer", "text_encoder"]


def test_gpu_variant(built: dict[str, Path], tmp_path: Path) -> None:
    out = built["tiny"]
    facts = export.load_components(out / "diffusers").facts
    onnx_paths = {s: out / "onnx" / f"{s}.onnx" for s in export.STAGES}
    repo = tmp_path / "repository"
    repository.write_repository(
        repo,
        facts,
        onnx_paths,
        out / "diffusers" / "tokenizer",
        target="gpu",
        max_batch_size=16,
        source="tiny",
    )
    gpu_kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
    for stage in export.STAGES:
        config = parse_config(repo / stage / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        assert config.max_batch_size == 16
        assert config.instance_group[0].kind == gpu_kind
        assert (repo / stage / "1" / "model.onnx").is_file()
        assert not (repo / stage / "1" / "model.py").exists()
    assert parse_config(repo / "tokenizer" / "config.pbtxt").backend == "python"
    unet = params(parse_config(repo / "unet" / "config.pbtxt"))
    assert unet["size_multiple"] == "8"
    # a model from a folder on GPU: twice its native size, the engine profile's largest shape
    assert unet["max_width"] == unet["max_height"] == "128"
    assert "ort_arena_keep_mb" not in unet
    script = (repo / "convert.sh").read_text()
    subprocess.run(["bash", "-n", str(repo / "convert.sh")], check=True)
    for stage in export.STAGES:
        assert f"$HERE/{stage}/1/model.plan" in script
    assert "--minShapes=sample:1x4x2x2,timestep:1x1,encoder_hidden_states:1x77x64" in script
    assert "--maxShapes=sample:16x4x32x32,timestep:16x1,encoder_hidden_states:16x77x64" in script
    assert (repo / "README.md").is_file()


@pytest.mark.parametrize("preset", ["tiny", "micro"])
@pytest.mark.parametrize("stage", export.STAGES)
def test_onnx_matches_torch(
    built: dict[str, Path], components: dict[str, export.Components], preset: str, stage: str
) -> None:
    comp = components[preset]
    path = built[preset] / "onnx" / f"{stage}.onnx"
    output = export.STAGE_SPECS[stage].outputs[0]
    cases: list[tuple[int, tuple[int, int] | None]] = [(1, None), (3, None)]
    if stage != "text_encoder":
        cases.append((2, (8, 12)))  # other spatial sizes than the traced one
    for batch, hw in cases:
        inputs = export.sample_inputs(comp.facts, stage, batch, latent_hw=hw, seed=batch)
        want = export.run_torch(comp, stage, inputs)[output]
        got = export.run_onnx(path, inputs)[output]
        assert got.shape == want.shape
        assert got.shape[0] == batch
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_unet_fractional_timesteps(
    built: dict[str, Path], components: dict[str, export.Components]
) -> None:
    comp = components["tiny"]
    path = built["tiny"] / "onnx" / "unet.onnx"
    inputs = export.sample_inputs(comp.facts, "unet", 2)
    inputs["timestep"] = np.array([[500.0], [500.0]], dtype=np.float32)
    whole = export.run_onnx(path, inputs)["noise_pred"]
    inputs["timestep"] = np.array([[500.5], [500.0]], dtype=np.float32)
    frac = export.run_onnx(path, inputs)["noise_pred"]
    assert not np.allclose(whole[0], frac[0])  # 500.5 is not rounded to 500
    np.testing.assert_allclose(whole[1], frac[1], atol=1e-5)
    np.testing.assert_allclose(
        frac, export.run_torch(comp, "unet", inputs)["noise_pred"], atol=1e-4
    )


def test_tokenizer_ids(built: dict[str, Path]) -> None:
    from transformers import CLIPTokenizer

    repo_tok = built["tiny"] / "repository" / "tokenizer" / "1" / "tokenizer"
    for folder in (built["tiny"] / "diffusers" / "tokenizer", repo_tok):
        tok = CLIPTokenizer.from_pretrained(str(folder))
        assert tok.model_max_length == 77
        assert len(tok) == 49408
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        padded = tok(
            ["a photo of a cat", "word " * 200],
            padding="max_length",
            max_length=77,
            truncation=True,
        ).input_ids
        assert [len(p) for p in padded] == [77, 77]
        assert padded[0][7:] == [49407] * 70
        assert padded[1][0] == 49406 and padded[1][-1] == 49407


def test_pipeline_loads(built: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(built["micro"] / "diffusers"), safety_checker=None, requires_safety_checker=False
    )
    assert pipe.vae_scale_factor == 2
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_from_folder_is_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    """`--from` on the saved preset gives byte-identical ONNX files (same code path)."""
    source = built["micro"] / "diffusers"
    repo = build_models(None, str(source), tmp_path)
    assert repo == tmp_path / "repository"
    assert not (tmp_path / "diffusers").exists()
    for stage in export.STAGES:
        assert (tmp_path / "onnx" / f"{stage}.onnx").read_bytes() == (
            built["micro"] / "onnx" / f"{stage}.onnx"
        ).read_bytes()
    config = parse_config(repo / "unet" / "config.pbtxt")
    assert params(config)["source"] == str(source.resolve())
    # a model from a folder on CPU declares its native size (the preset's own is measured)
    assert params(config)["max_width"] == params(config)["max_height"] == "32"


def test_declared_limits_of_folders_presets_and_targets(
    components: dict[str, export.Components],
) -> None:
    tiny = components["tiny"].facts  # native 64, size multiple 8
    limits = repository.serving_limits
    assert limits(tiny, "cpu") == repository.ServingLimits(64, 64)
    assert limits(tiny, "gpu") == repository.ServingLimits(128, 128)
    assert limits(tiny, "cpu", preset_max_size=100) == repository.ServingLimits(96, 96)
    assert limits(tiny, "gpu", preset_max_size=4) == repository.ServingLimits(8, 8)
    with pytest.raises(ValueError):
        limits(tiny, "tpu")
    # the TensorRT profile's largest shape follows a declared limit
    script = repository.render_convert_script(tiny, 8, repository.ServingLimits(192, 96))
    assert "--maxShapes=sample:8x4x24x48," in script
    assert "--maxShapes=image:8x3x96x192" in script


def test_bad_source_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_build(
        preset=None,
        source=str(tmp_path / "nope"),
        out=tmp_path / "o",
        target="cpu",
        max_batch_size=8,
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half" / "unet").mkdir(parents=True)
    code = run_build(
        preset=None,
        source=str(tmp_path / "half"),
        out=tmp_path / "o",
        target="cpu",
        max_batch_size=8,
    )
    assert code == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(BuildError):
        build_models("huge", None, tmp_path / "o")
    with pytest.raises(BuildError):
        build_models("tiny", None, tmp_path / "o", max_batch_size=0)


def test_stage_template_helpers() -> None:
    stage = load_template("onnx_stage")
    keys = [((4, 8, 8, "<f4"),), ((4, 8, 8, "<f4"),), ((4, 6, 6, "<f4"),), ((4, 8, 8, "<f4"),)]
    assert stage.group_requests(keys) == [[0, 1, 3], [2]]
    assert stage.split_points([1, 2, 3]) == [1, 3]
    assert stage.split_points([4]) == []
    feed = {"sample": np.ones((3, 4, 8, 8), np.float32), "t": np.arange(3.0).reshape(3, 1)}
    row = stage.one_row(feed)
    assert {k: v.shape for k, v in row.items()} == {"sample": (1, 4, 8, 8), "t": (1, 1)}
    assert stage.feed_bytes(row) == 4 * 256 + 8
    before = stage.resident_kib()
    grown = np.ones(64 * 1024 * 1024, np.uint8)  # 64 MiB, touched
    assert stage.resident_kib() - before > 60 * 1024
    del grown
    tok = load_template("tokenizer")
    arr = np.array([[b"a cat"], ["caf\u00e9".encode()]], dtype=object)
    assert tok.decode_prompts(arr) == ["a cat", "caf\u00e9"]


def test_cached_builds_of_an_older_format_are_rebuilt(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.models import build as build_module

    repo = built["micro"] / "repository"
    assert build_module.is_current(repo)
    stale = tmp_path / "stale"
    (stale / "repository").mkdir(parents=True)
    (stale / "repository" / build_module.FORMAT_FILE).write_text("0\n")
    assert not build_module.is_current(stale / "repository")
    calls: list[str] = []
    monkeypatch.setattr(
        build_module, "build_models", lambda **kw: calls.append(kw["preset"]) or kw["out"]
    )
    build_module.ensure_preset("micro", stale)
    assert calls == ["micro"]
    build_module.ensure_preset("micro", built["micro"])  # current: not rebuilt
    assert calls == ["micro"]


def test_gpu_variant_declares_fp16_io_where_the_engine_is_fp16(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 14: the GPU engines run in fp16 (convert.sh's --fp16), so their float inputs and
    outputs are fp16 on the wire; the CPU variant stays fp32; timestep is fp32 everywhere. The
    I/O formats convert.sh gives trtexec follow the ONNX graph's own tensor order."""
    import onnx

    out = built["tiny"]
    facts = export.load_components(out / "diffusers").facts
    onnx_paths = {s: out / "onnx" / f"{s}.onnx" for s in export.STAGES}
    fp16, fp32 = model_config_pb2.TYPE_FP16, model_config_pb2.TYPE_FP32
    for target, want in (("gpu", fp16), ("cpu", fp32)):
        repo = tmp_path / target
        repository.write_repository(
            repo,
            facts,
            onnx_paths,
            out / "diffusers" / "tokenizer",
            target=target,
            max_batch_size=4,
            source="tiny",
        )
        for model in [*export.STAGES, "encode_prompt", repository.COND_CACHE_MODEL]:
            config = parse_config(repo / model / "config.pbtxt")
            for tensor in [*config.input, *config.output]:
                if tensor.name == "timestep":
                    assert tensor.data_type == fp32, (target, model)
                elif tensor.data_type not in (
                    model_config_pb2.TYPE_INT64,
                    model_config_pb2.TYPE_STRING,
                ):
                    assert tensor.data_type == want, (target, model, tensor.name)
    script = (tmp_path / "gpu" / "convert.sh").read_text()
    names = {
        model_config_pb2.TYPE_FP16: "fp16:chw",
        fp32: "fp32:chw",
        model_config_pb2.TYPE_INT64: "int64:chw",
    }
    for stage in ("text_encoder", "vae_encoder", "unet", "vae_decoder"):
        graph = onnx.load(str(onnx_paths[stage]), load_external_data=False).graph
        config = parse_config(tmp_path / "gpu" / stage / "config.pbtxt")
        by_name = {t.name: names[t.data_type] for t in [*config.input, *config.output]}
        formats_in = ",".join(by_name[i.name] for i in graph.input)
        formats_out = ",".join(by_name[o.name] for o in graph.output)
        block = script.split(f'building {stage}/1/model.plan"')[1].split("echo ")[0]
        assert "--fp16 \\" in block
        assert f"--inputIOFormats={formats_in} \\" in block, stage
        assert f"--outputIOFormats={formats_out} \\" in block, stage


def test_torch_stage_variant(built: dict[str, Path], tmp_path: Path) -> None:
    """bench/gpu_triton.py's repository: the generator's configs for each target, with every
    stage a Python-backend model running torch (fp16 on KIND_GPU for "gpu", fp32 on the CPU),
    the stage template in place and no ONNX file or TensorRT script."""
    out = built["tiny"]
    facts = export.load_components(out / "diffusers").facts
    fp16, fp32 = model_config_pb2.TYPE_FP16, model_config_pb2.TYPE_FP32
    kinds = model_config_pb2.ModelInstanceGroup
    for target, kind, dtype, wire in (
        ("gpu", kinds.KIND_GPU, "float16", fp16),
        ("cpu", kinds.KIND_CPU, "float32", fp32),
    ):
        repo = tmp_path / target
        repository.write_repository(
            repo,
            facts,
            {},
            out / "diffusers" / "tokenizer",
            target=target,
            max_batch_size=64,
            source="tiny",
            torch_folder=out / "diffusers",
        )
        for stage in export.STAGES:
            config = parse_config(repo / stage / "config.pbtxt")
            assert config.backend == "python", (target, stage)
            assert config.instance_group[0].kind == kind, (target, stage)
            assert config.dynamic_batching.max_queue_delay_microseconds == 1000
            p = params(config)
            assert p["runtime"] == "torch" and p["torch_dtype"] == dtype
            assert p["torch_device"] == ("cuda" if target == "gpu" else "cpu")
            assert Path(p["model_folder"]) == (out / "diffusers").resolve()
            assert "ort_intra_op_threads" not in p
            assert (repo / stage / "1" / "model.py").read_text() == (
                TEMPLATES / "onnx_stage" / "model.py"
            ).read_text()
            assert not list((repo / stage / "1").glob("*.onnx"))
            for tensor in [*config.input, *config.output]:
                if tensor.data_type != model_config_pb2.TYPE_INT64 and tensor.name != "timestep":
                    assert tensor.data_type == wire, (target, stage, tensor.name)
        assert not (repo / "convert.sh").exists()
        bls = params(parse_config(repo / repository.BLS_MODEL / "config.pbtxt"))
        assert bls.get("stage_floats") == ("fp16" if target == "gpu" else None)


def test_torch_stage_session_runs_the_exported_wrapper(
    built: dict[str, Path], components: dict[str, export.Components]
) -> None:
    """The stage template's torch runtime loads only its stage's component and answers what
    the ONNX export's wrapper computes, in the config's output dtype."""
    template = load_template("onnx_stage")
    folder = built["tiny"] / "diffusers"
    facts = components["tiny"].facts
    for stage in export.STAGES:
        spec = export.STAGE_SPECS[stage]
        config = {"name": stage, "output": [{"name": spec.outputs[0], "data_type": "TYPE_FP32"}]}
        session = template.TorchSession(
            {"runtime": "torch", "model_folder": str(folder), "torch_dtype": "float32"},
            config,
            {"model_instance_kind": "CPU"},
        )
        inputs = export.sample_inputs(facts, stage, 2, latent_hw=(8, 8), seed=3)
        [got] = session.run(list(spec.outputs), dict(inputs))
        want = export.run_torch(components["tiny"], stage, inputs)[spec.outputs[0]]
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
