"""Stage roles: a job cut after encode and after denoise, carried through the real codec bytes,
resumes exactly: encode -> EncodedRequest -> denoise -> DenoisedLatents -> decode gives the same
image bits as running the job straight through (`--role all`). Micro random-weight models run in
process (TorchStageRunner), no servers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from PIL import Image

from orchestrator.adapters.avro import (
    HEADER_SIZE,
    AvroCodec,
    DenoisedLatentsRecord,
    EncodedRequestRecord,
    unframe,
)
from orchestrator.config import Settings
from orchestrator.core.pipeline import Job, Phase, advance, plan, start_job
from orchestrator.core.roles import (
    SD15,
    SDXL,
    DenoisedState,
    EncodedState,
    HandoffShapes,
    Role,
    handoff_after_denoise,
    handoff_after_encode,
    handoff_sizes,
    job_from_denoised,
    job_from_encoded,
)
from orchestrator.core.validation import Limits
from orchestrator.domain import GenerationRequest, ModelInfo, StageCall
from orchestrator.errors import InferenceError
from orchestrator.executor import run_job
from orchestrator.testing import TorchStageRunner

ROOT = Path(__file__).resolve().parents[2]
CODEC = AvroCodec()


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchStageRunner, ModelInfo]]:
    from orchestrator.models.presets import get_preset, save_preset

    preset = get_preset("micro")
    folder = save_preset(preset, tmp_path_factory.mktemp("micro") / "diffusers")
    runner = TorchStageRunner.from_pretrained(str(folder))
    yield runner, runner.model_info(dict(preset.scheduler))


class Fp16TextEncoder:
    """The runner, with the text encoder's output rounded to float16 (as an fp16 model's is)."""

    def __init__(self, inner: TorchStageRunner) -> None:
        self.inner = inner

    def run(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        out = self.inner.run(call)
        if call.model == "encode_prompt":
            out["text_embeds"] = out["text_embeds"].astype(np.float16)
        return out

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        return self.run(call)


def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _run_role(job: Job, runner: TorchStageRunner | Fp16TextEncoder, role: Role) -> None:
    while role.runs(job):
        advance(job, runner.run(plan(job)))


def _through_roles(
    request: GenerationRequest, info: ModelInfo, runner: TorchStageRunner | Fp16TextEncoder
) -> tuple[Job, bytes, bytes]:
    """encode, hand off through the codec's bytes, denoise, hand off again, decode."""
    job = start_job(request, info)
    _run_role(job, runner, Role.ENCODE)
    assert job.phase is Phase.DENOISE
    encoded = handoff_after_encode(job)
    wire1 = CODEC.encode_encoded(
        EncodedRequestRecord(
            request=encoded.request,
            text_embeds=encoded.text_embeds,
            init_latents=encoded.init_latents,
            prompt_truncated=encoded.prompt_truncated,
            reply_topic="diffusion.replies.test",
            timings_ms={"encode_prompt": 1.5},
            model_versions={"source": "micro"},
        )
    )
    job = job_from_encoded(CODEC.decode_encoded(wire1), info, Limits())
    _run_role(job, runner, Role.DENOISE)
    assert job.phase is Phase.DECODE
    denoised = handoff_after_denoise(job)
    wire2 = CODEC.encode_denoised(
        DenoisedLatentsRecord(
            request=denoised.request,
            latents=denoised.latents,
            prompt_truncated=denoised.prompt_truncated,
            unet_calls=denoised.unet_calls,
        )
    )
    job = job_from_denoised(CODEC.decode_denoised(wire2), info, Limits())
    _run_role(job, runner, Role.DECODE)
    assert job.done
    return job, wire1, wire2


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "heun"])
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
async def test_roles_chained_through_records_equal_role_all_bit_for_bit(
    micro: tuple[TorchStageRunner, ModelInfo], scheduler: str, guidance: float, img2img: bool
) -> None:
    runner, info = micro
    request = GenerationRequest(
        prompt="a red cube on a table",
        negative_prompt="blurry",
        seed=1234,
        steps=4,
        scheduler=scheduler,
        guidance_scale=guidance,
        num_images=2,
        init_image=_png(info.default_width, info.default_height) if img2img else None,
        strength=0.6,
        request_id="r-1",
    )
    straight = await run_job(start_job(request, info), runner)
    chained, wire1, _ = _through_roles(request, info, runner)

    assert len(chained.images) == len(straight.images) == 2
    for ours, theirs in zip(chained.images, straight.images, strict=True):
        assert ours.dtype == theirs.dtype == np.uint8
        assert np.array_equal(ours, theirs)
    # the micro text encoder is fp32: its embeddings are not float16-exact, so they travel as
    # float32 (an fp16 encoder's travel as float16: the next test)
    record = CODEC.decode_encoded(wire1)
    assert record.text_embeds.shape[0] == (2 if guidance > 1 else 1)
    assert (record.init_latents is not None) == img2img
    assert record.timings_ms == {"encode_prompt": 1.5}
    assert record.reply_topic == "diffusion.replies.test"
    body = unframe(wire1)[1]
    assert b"float32" in body and b"float16" not in body


async def test_fp16_text_embeddings_travel_as_float16_and_stay_bit_exact(
    micro: tuple[TorchStageRunner, ModelInfo],
) -> None:
    runner, info = micro
    fp16 = Fp16TextEncoder(runner)
    request = GenerationRequest(prompt="a cat", seed=9, steps=3, num_images=2, request_id="r-2")
    straight = await run_job(start_job(request, info), fp16)
    chained, wire1, wire2 = _through_roles(request, info, fp16)
    for ours, theirs in zip(chained.images, straight.images, strict=True):
        assert np.array_equal(ours, theirs)
    text_bytes = 2 * info.text_max_length * info.text_embed_dim * 2
    fp32_text_bytes = 2 * text_bytes
    assert unframe(wire1)[1].count(b"float16") == 1
    # the fp16 record is smaller than an fp32 one by the halved embeddings
    fp32 = CODEC.encode_encoded(
        EncodedRequestRecord(
            request=CODEC.decode_encoded(wire1).request,
            text_embeds=CODEC.decode_encoded(wire1).text_embeds + np.float32(1e-4),
            init_latents=None,
        )
    )
    assert len(fp32) - len(wire1) >= fp32_text_bytes - text_bytes - 64
    assert b"float32" in unframe(wire2)[1]  # the final latents are fp32 scheduler arithmetic


def test_handoffs_refuse_a_job_in_the_wrong_phase(
    micro: tuple[TorchStageRunner, ModelInfo],
) -> None:
    _, info = micro
    job = start_job(GenerationRequest(prompt="x", steps=2), info)
    with pytest.raises(RuntimeError, match="not at its first denoising step"):
        handoff_after_encode(job)
    with pytest.raises(RuntimeError, match="has not finished denoising"):
        handoff_after_denoise(job)


def test_resuming_checks_the_tensors_against_this_roles_model(
    micro: tuple[TorchStageRunner, ModelInfo],
) -> None:
    _, info = micro
    request = GenerationRequest(
        prompt="x", steps=2, num_images=2, width=info.default_width, height=info.default_height
    )
    embeds = np.zeros((1, info.text_max_length, info.text_embed_dim), dtype=np.float32)
    # guided (7.5) needs two rows, negative and positive
    with pytest.raises(InferenceError, match="1 rows, expected 2"):
        job_from_encoded(EncodedState(request, embeds, None, False), info)
    wrong = np.zeros((2, info.latent_channels, 3, 3), dtype=np.float32)
    with pytest.raises(InferenceError, match="different models"):
        job_from_denoised(DenoisedState(request, wrong, False, 2), info)


def test_roles_split_the_phases() -> None:
    assert Role("encode").phases == {Phase.ENCODE_PROMPT, Phase.ENCODE_IMAGE}
    assert Role("denoise").phases == {Phase.DENOISE}
    assert Role("decode").phases == {Phase.DECODE}
    assert Role.ALL.phases == Role.ENCODE.phases | Role.DENOISE.phases | Role.DECODE.phases
    assert Phase.DONE not in Role.ALL.phases


def _topic_max_bytes() -> dict[str, int]:
    docs = yaml.safe_load_all((ROOT / "k8s/kafka/topics.yaml").read_text())
    return {d["metadata"]["name"]: int(d["spec"]["config"]["max.message.bytes"]) for d in docs if d}


@pytest.mark.parametrize("shapes", [SD15, SDXL], ids=lambda s: s.name)
def test_handoff_sizes_bound_the_real_records_and_fit_the_record_limit(
    shapes: HandoffShapes,
) -> None:
    limits = Settings().limits()
    max_record = Settings().max_record_bytes
    sizes = handoff_sizes(shapes, limits)
    f = shapes.vae_scale_factor
    n = limits.max_num_images
    request = GenerationRequest(
        prompt="\U0001f600" * limits.max_prompt_chars,
        negative_prompt="\U0001f600" * limits.max_prompt_chars,
        width=limits.max_width,
        height=limits.max_height,
        num_images=n,
        guidance_scale=7.5,
        strength=0.5,
        request_id="r" * 64,
        deadline=2e9,
        priority="normal",
    )
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(
        (n, shapes.latent_channels, limits.max_height // f, limits.max_width // f),
        dtype=np.float32,
    )
    embeds = rng.standard_normal(
        (2, shapes.text_max_length, shapes.text_embed_dim), dtype=np.float32
    ).astype(np.float16)  # an fp16 text encoder
    timings = {f"stage_{i}": 1234.5 for i in range(8)}
    versions = {f"model_{i}": "v" * 32 for i in range(8)}
    actual = {
        "EncodedRequest": len(
            CODEC.encode_encoded(
                EncodedRequestRecord(
                    request,
                    embeds.astype(np.float32),
                    latents,
                    True,
                    "diffusion.replies." + "x" * 200,
                    timings,
                    versions,
                )
            )
        ),
        "DenoisedLatents": len(
            CODEC.encode_denoised(
                DenoisedLatentsRecord(
                    request, latents, True, 150, "diffusion.replies." + "x" * 200, timings, versions
                )
            )
        ),
    }
    topic_limit = min(_topic_max_bytes().values())
    for name, size in actual.items():
        assert size > HEADER_SIZE
        assert size <= sizes[name], (name, size, sizes[name])
        assert sizes[name] - size < 8192, f"{name}: the bound is loose by {sizes[name] - size}"
        # what docs/architectures.md says: at the default limits every hand-off fits
        assert sizes[name] <= max_record < topic_limit
