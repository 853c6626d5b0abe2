"""Stage roles in the service, without servers: the executor stops at a role's boundary, the
hand-offs chain to the images of one run, the encode role refuses what cannot travel, and the
role's setting, flag, topics, groups and metric label."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.adapters.avro import AvroCodec, EncodedRequestRecord
from orchestrator.adapters.kafka import header_str
from orchestrator.adapters.metrics import Metrics
from orchestrator.cli import _settings, build_parser
from orchestrator.config import load_settings
from orchestrator.core.pipeline import Phase, finish, start_job
from orchestrator.core.roles import Role
from orchestrator.core.validation import Limits
from orchestrator.domain import GenerationRequest
from orchestrator.errors import ValidationError
from orchestrator.executor import run_job, run_phases
from orchestrator.handoff import Handoffs, merge_timings
from orchestrator.service import Service
from tests.unit.test_executor import Echo
from tests.unit.test_record_invariant import (
    ERRORS,
    PARTITIONS,
    TOPIC,
    Log,
    Plan,
    _dlq_rid,
    _record,
    check_invariant,
    run_until_committed,
)
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


# -- the record invariant, in a stage role -------------------------------------------------------

role_plans = st.builds(
    Plan,
    kind=st.sampled_from(["good", "good", "garbage", "invalid"]),
    null_header=st.just(False),
    fail_at=st.sampled_from([None, None, "run", "publish"]),
    error=st.sampled_from(["TypeError", "InferenceError"]),
    answer_unavailable=st.integers(0, 2),
    dlq_unavailable=st.integers(0, 2),
    dlq_refuses_original=st.booleans(),
    answer_refused=st.booleans(),
)


async def _run_denoise_role(plan_list: list[Plan]) -> tuple[Log, list[Any], dict[str, Plan]]:
    """The real Service as `--role denoise` (intake, handling, answering, Kafka adapters)
    against in-memory doubles of aiokafka: EncodedRequest records in on TOPIC, its
    DenoisedLatents out on "answers" (the hand-off stands where role all's answer would)."""
    cfg = load_settings(
        None,
        bootstrap_servers="127.0.0.1:1",
        triton_url="127.0.0.1:1",
        role="denoise",
        encoded_topic=TOPIC,
        denoised_topic="answers",
        dlq_topic="dead",
        http_port=0,
        http_host="127.0.0.1",
        tracing=False,
        batching="naive",
        record_retry_initial_s=0.005,
        record_retry_max_s=0.02,
        prompt_cache_entries=0,
    )
    service = Service(cfg)
    log = Log()
    plans: dict[str, Plan] = {}
    records: dict[int, list[Any]] = {p: [] for p in range(PARTITIONS)}
    for i, plan in enumerate(plan_list):
        rid = f"r{i}"
        plans[rid] = plan
        request = GenerationRequest(prompt="p", steps=2 if plan.kind != "invalid" else 0)
        embeds = np.ones((2, INFO.text_max_length, INFO.text_embed_dim), np.float32)
        handoff = EncodedRequestRecord(
            request=dataclasses.replace(request, request_id=rid, width=64, height=64),
            text_embeds=embeds,
        )
        value = b"\x07garbage" if plan.kind == "garbage" else service.codec.encode_encoded(handoff)
        partition = i % PARTITIONS
        headers: list[Any] = [("correlation_id", rid.encode())]
        records[partition].append(_record(partition, len(records[partition]), value, headers))

    async def run_stage(job: Any, stats: Any) -> dict[str, float]:
        await asyncio.sleep(0)
        plan = plans[job.request.request_id]
        if plan.fail_at == "run":
            raise ERRORS[plan.error]()
        job.latents = torch.zeros(job.latent_shape)
        job.phase = Phase.DECODE
        return {"unet": 1.0}

    service.handling.run_stage = run_stage  # type: ignore[method-assign]
    await run_until_committed(service, log, records, plans)
    return log, [r for p in sorted(records) for r in records[p]], plans


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan_list=st.lists(role_plans, min_size=1, max_size=6))
def test_a_stage_role_ends_every_record_once_before_its_commit(plan_list: list[Plan]) -> None:
    log, records, by_rid = asyncio.run(_run_denoise_role(plan_list))
    check_invariant(log, records, by_rid)
    codec = AvroCodec()
    for _, topic, key, value, headers in log.acks:
        if topic == "dead":  # the stage names the role
            assert (header_str(headers, "dlq.error.stage") or "").startswith("denoise."), headers
        else:  # the hand-off: keyed by request id, the correlation id on it, decodable
            assert value is not None and key is not None
            assert header_str(headers, "correlation_id") == key.decode()
            assert codec.decode_denoised(value).request.request_id == key.decode()
    handed = {key.decode() for _, topic, key, _, _ in log.acks if topic == "answers" and key}
    for rid, plan in by_rid.items():
        # a hand-off the broker refused or did not acknowledge is dead-lettered (publish_failed),
        # as role all's answer is
        clean = not plan.answer_refused and plan.answer_unavailable == 0
        if plan.kind == "good" and plan.fail_at is None and clean:
            assert rid in handed, (rid, plan)
        if plan.kind == "garbage":
            dead = [h for _, t, _, _, h in log.acks if t == "dead" and _dlq_rid(h) == rid]
            assert header_str(dead[0], "dlq.error.stage") == "denoise.decode"
