"""Stage roles in the service, without servers: the executor stops at a role's boundary, the
hand-offs chain to the images of one run, the encode role refuses what cannot travel, and the
role's setting, flag, topics, groups and metric label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.metrics import Metrics
from orchestrator.cli import _settings, build_parser
from orchestrator.config import load_settings
from orchestrator.core.pipeline import Phase, finish, start_job
from orchestrator.core.roles import Role
from orchestrator.core.validation import Limits
from orchestrator.errors import ValidationError
from orchestrator.executor import run_job, run_phases
from orchestrator.handoff import Handoffs, merge_timings
from tests.unit.test_executor import Echo
from tests.unit.test_validation import INFO

SETTINGS = load_settings(None, bootstrap_servers="127.0.0.1:1", triton_url="127.0.0.1:1")
CODEC = AvroCodec()


def handoffs(role: str, **overrides: object) -> Handoffs:
    settings = SETTINGS.model_copy(update=overrides)
    return Handoffs(Role(role), CODEC, settings)


@pytest.mark.parametrize(
    ("request_", "phase"),
    [
        (dict(prompt="x", steps=4, scheduler="euler_a", seed=3, num_images=2), Phase.DENOISE),
        (dict(prompt="x", steps=4, guidance_scale=1.0, seed=5), Phase.DENOISE),
    ],
)
async def test_the_roles_chained_through_the_codec_equal_one_run(
    request_: dict[str, object], phase: Phase
) -> None:
    from orchestrator.domain import GenerationRequest

    request = GenerationRequest(**request_, request_id="r")  # type: ignore[arg-type]
    whole = await run_job(start_job(request, INFO), Echo())

    encode, denoise, decode = handoffs("encode"), handoffs("denoise"), handoffs("decode")
    job = start_job(request, INFO)
    runner = Echo()
    timings = await run_phases(job, runner, phases=Role.ENCODE.phases)
    assert job.phase is phase and job.unet_calls == 0
    assert {c.model for c in runner.calls} == {"encode_prompt"}
    first = encode.hand_on(job, encode.read(CODEC.encode_request(request)), "answers", timings)
    assert first.topic == SETTINGS.encoded_topic

    incoming = denoise.read(first.value)
    assert incoming.reply_topic == "answers" and incoming.resume is not None
    job = incoming.resume(INFO, SETTINGS.limits())
    runner = Echo()
    timings = await run_phases(job, runner, phases=Role.DENOISE.phases)
    assert job.phase is Phase.DECODE and {c.model for c in runner.calls} == {"unet"}
    second = denoise.hand_on(job, incoming, "answers", timings)
    assert second.topic == SETTINGS.denoised_topic

    incoming = decode.read(second.value)
    assert incoming.resume is not None
    job = incoming.resume(INFO, SETTINGS.limits())
    images = finish(job, await run_phases(job, Echo(), phases=Role.DECODE.phases)).images
    for a, b in zip(whole.images, images, strict=True):
        np.testing.assert_array_equal(a, b)
    # each role's timings add up in the record the next role reads
    assert {"encode_prompt", "unet"} <= set(incoming.timings_ms)
    with pytest.raises(RuntimeError, match="answers"):
        decode.hand_on(job, incoming, "answers", {})


def test_topics_groups_and_what_each_role_answers() -> None:
    want = {
        "all": (SETTINGS.request_topic, SETTINGS.group_id, True),
        "encode": (SETTINGS.request_topic, f"{SETTINGS.group_id}-encode", False),
        "denoise": ("diffusion.stage.encoded", f"{SETTINGS.group_id}-denoise", False),
        "decode": ("diffusion.stage.denoised", f"{SETTINGS.group_id}-decode", True),
    }
    for role, (topic, group, answers) in want.items():
        h = handoffs(role)
        assert (h.input_topic, h.group_id, h.answers) == (topic, group, answers), role
    topics = SETTINGS.service_topics()
    assert "diffusion.stage.encoded" in topics and "diffusion.stage.denoised" in topics


def test_the_encode_role_refuses_at_admission_what_cannot_travel() -> None:
    from orchestrator.domain import GenerationRequest

    big = GenerationRequest(prompt="x", steps=2, width=512, height=512, num_images=8)
    job = start_job(big, INFO, Limits(max_num_images=8))
    # 8 x 4 x 128 x 128 float32 latents = 2 MiB: fits 4 MiB, not 1 MiB
    handoffs("encode").check_fits(job)
    with pytest.raises(ValidationError) as refused:
        handoffs("encode", max_record_bytes=1024 * 1024).check_fits(job)
    assert refused.value.field == "num_images"
    handoffs("all", max_record_bytes=1024 * 1024).check_fits(job)  # role all hands nothing on


def test_merge_timings_sums_per_model() -> None:
    merged = merge_timings({"unet": 2.0, "total": 3.0}, {"unet": 1.0, "vae_decoder": 4.0})
    assert merged == {"unet": 3.0, "total": 3.0, "vae_decoder": 4.0}


def test_serve_role_flag_sets_the_role_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_ROLE", "encode")
    parser = build_parser()
    assert _settings(parser.parse_args(["serve"])).role == "encode"
    assert _settings(parser.parse_args(["serve", "--role", "decode"])).role == "decode"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--role", "sample"])


def test_a_stage_role_labels_every_metric() -> None:
    metrics = Metrics(labels={"role": "denoise"})
    metrics.requests.labels("handed_on").inc()
    text = metrics.render().decode()
    assert 'orchestrator_requests_total{outcome="handed_on",role="denoise"} 1.0' in text
    assert 'orchestrator_jobs_in_flight{role="denoise"} 0.0' in text
    plain = Metrics().render().decode()
    assert "orchestrator_jobs_in_flight 0.0" in plain and "role=" not in plain


def test_dev_runs_role_all_whatever_the_role_setting(tmp_path: Path) -> None:
    from orchestrator.dev import DevStack

    stack = DevStack(models_dir=tmp_path, work_dir=tmp_path)
    encode = SETTINGS.model_copy(update={"role": "encode"})
    assert stack.service_settings(encode).role == "all"
