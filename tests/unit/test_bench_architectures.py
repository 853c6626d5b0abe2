"""The pure parts of `orchestrator bench --architectures`: the workload, the figures from Triton's
statistics (BLS), from the answers' timings and from the records read back, and the verdicts."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.bench_architectures import (
    PointResult,
    format_point,
    mixed_sizes,
    stages_from_answers,
    stages_from_triton,
    traffic_figures,
    workload_requests,
)
from orchestrator.domain import ModelInfo


def info() -> ModelInfo:
    return ModelInfo(
        latent_channels=4,
        vae_scale_factor=8,
        scaling_factor=0.18215,
        size_multiple=16,
        default_height=64,
        default_width=64,
        text_max_length=77,
        text_embed_dim=32,
        scheduler_config={},
    )


def test_mixed_workload_varies_size_steps_guidance_and_img2img() -> None:
    reqs = workload_requests("mixed", 20, 4, info())
    assert {(r.width, r.height) for r in reqs} == set(mixed_sizes(info()))
    assert mixed_sizes(info()) == [(64, 64), (32, 32), (64, 32)]
    assert len({r.steps for r in reqs}) == 3
    assert sum(r.guidance_scale <= 1.0 for r in reqs) == 4
    img2img = [r for r in reqs if r.init_image is not None]
    assert len(img2img) == 5
    assert all(int(r.steps * r.strength) >= 1 for r in img2img)
    assert len({r.prompt for r in reqs}) == 20  # no prompt-cache hits
    uniform = workload_requests("uniform", 5, 4, info())
    assert {(r.steps, r.scheduler, r.width, r.init_image) for r in uniform} == {
        (4, "ddim", None, None)
    }
    # the same requests for every architecture: seeds and prompts depend on the index only
    again = workload_requests("mixed", 20, 4, info())
    assert [(r.prompt, r.seed) for r in again] == [(r.prompt, r.seed) for r in reqs]


def test_bls_stage_means_from_triton_statistics() -> None:
    ms = 1_000_000
    delta = {
        "tokenizer": {"compute_ns": 2 * ms, "queue_ns": 0, "requests": 4},
        "text_encoder": {"compute_ns": 6 * ms, "queue_ns": 2 * ms, "requests": 4},
        "unet": {"compute_ns": 9000 * ms, "queue_ns": 1000 * ms, "requests": 16},
        "vae_decoder": {"compute_ns": 40 * ms, "queue_ns": 0, "requests": 4},
    }
    stages = stages_from_triton(delta, ok=4)
    assert stages["prompt"].mean_ms == pytest.approx(2.5)
    assert stages["sampling"].mean_ms == pytest.approx(2500.0)
    assert stages["decoding"].mean_ms == pytest.approx(10.0)
    assert stages["image"].mean_ms is None  # no vae_encoder calls
    # a mean over the target: the p95 is over it too; under it: unknown
    assert stages["sampling"].verdict == "missed"
    assert stages["prompt"].verdict == "n/a"
    assert all(s.source == "triton-stats" and s.p95_ms is None for s in stages.values())


def test_stage_percentiles_from_answers_and_verdicts() -> None:
    timings = [
        {"encode_prompt": 10.0 * k, "unet": 3000.0, "vae_decoder": 5.0} for k in range(1, 101)
    ]
    stages = stages_from_answers(timings)
    assert stages["prompt"].p50_ms == pytest.approx(505.0)
    assert stages["prompt"].p95_ms == pytest.approx(950.5)
    assert stages["prompt"].verdict == "met"  # p95 < 1000 ms
    assert stages["sampling"].verdict == "missed"  # p95 3000 >= 2000 ms
    assert stages["image"].samples == 0 and stages["image"].verdict == "n/a"


@dataclasses.dataclass
class Rec:
    topic: str
    serialized_key_size: int
    serialized_value_size: int
    headers: tuple[tuple[str, bytes], ...] = ()


def test_traffic_per_request_by_topic_kind() -> None:
    kinds = {"r": "requests", "e": "encoded", "d": "denoised", "a": "responses", "p": "progress"}
    records = [Rec(t, 10, 90, (("h", b"12345"),)) for t in "reda"] * 2 + [Rec("p", -1, 50)] * 6
    hops, recs, nbytes, by = traffic_figures(records, kinds, n=2)
    assert hops == 4.0  # request, two hand-offs, answer
    assert recs == 7.0
    assert by["progress"] == {"records": 3.0, "bytes": 150.0}
    assert by["encoded"] == {"records": 1.0, "bytes": 106.0}
    assert nbytes == pytest.approx(4 * 106 + 150)


def test_table_row_marks_targets_and_substitutions() -> None:
    stages = stages_from_answers([{"encode_prompt": 1.0, "unet": 2.0, "vae_decoder": 3.0}])
    point = PointResult(
        "micro",
        "gateway",
        "mixed",
        8,
        4,
        1,
        2,
        1.0,
        3.0,
        10.0,
        20.0,
        30.0,
        "met",
        stages,
        2.0,
        8.0,
        4096.0,
        {},
    )
    row = format_point(point)
    assert "3!*" in row  # one failed, img2img run as text-to-image
    assert row.rstrip().endswith("+?+++")
