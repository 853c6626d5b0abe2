"""Progress without servers: the per-job step throttle, latent previews, preview encoding, the
executor's on_step hook and the reporter's events (a recording publisher)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import socket
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from orchestrator.adapters.avro import AvroCodec, ProgressEventRecord
from orchestrator.adapters.kafka import CORRELATION_ID_HEADER, KafkaSettings
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.progress import ProgressPublisher, ProgressReporter, encode_preview
from orchestrator.config import Settings
from orchestrator.core.pipeline import start_job
from orchestrator.core.preview import LINEAR_MAPS, latents_to_rgb, preview_size
from orchestrator.core.progress import StepThrottle
from orchestrator.domain import GenerationRequest, JobEvent, StageCall
from orchestrator.executor import run_job
from tests.unit.test_validation import INFO, png


def drive(throttle: StepThrottle, steps: int, step_s: float) -> list[tuple[float, int, bool]]:
    """Run `steps` steps `step_s` apart; (time, step, preview) of each event sent."""
    sent = []
    for k in range(1, steps + 1):
        now = 100.0 + k * step_s
        decision = throttle.decide(now, k, steps)
        if decision.send:
            sent.append((now, k, decision.preview))
    return sent


@pytest.mark.parametrize(
    ("steps", "step_s", "expected_steps"),
    [
        (1, 0.01, [1]),
        (2, 0.01, [1, 2]),
        (4, 0.05, [1, 4]),  # all within 0.2 s: only the first and the last
        # a step every 0.1 s at 2 per s: every 5th step, and the last
        (12, 0.1, [1, 6, 11, 12]),
        (30, 0.1, [1, 6, 11, 16, 21, 26, 30]),
        (5, 1.0, [1, 2, 3, 4, 5]),  # slower than the limit: every step
    ],
)
def test_first_and_last_step_always_sent_and_the_rest_spaced(
    steps: int, step_s: float, expected_steps: list[int]
) -> None:
    throttle = StepThrottle(2.0, 1.0)
    sent = drive(throttle, steps, step_s)
    assert [k for _, k, _ in sent] == expected_steps
    assert throttle.sent == len(sent) and throttle.skipped == steps - len(sent)
    # apart from the last, events are at least 1/rate apart: any 1 s holds at most rate + 1
    times = [t for t, _, _ in sent]
    for a, b in itertools.pairwise(times[:-1]):
        assert b - a >= 0.5 - 1e-9
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 3


def test_jobs_throttle_independently() -> None:
    """Three jobs of 4, 12 and 30 steps interleaved in one batch (one shared clock)."""
    throttles = {n: StepThrottle(4.0, 1.0) for n in (4, 12, 30)}
    sent: dict[int, list[int]] = {n: [] for n in throttles}
    for k in range(1, 31):
        now = k * 0.05
        for n, throttle in throttles.items():
            if k <= n and throttle.decide(now, k, n).send:
                sent[n].append(k)
    assert sent[4] == [1, 4]
    assert sent[12] == [1, 6, 11, 12]
    assert sent[30] == [1, 6, 11, 16, 21, 26, 30]


def test_previews_only_when_asked_and_at_most_one_per_interval() -> None:
    assert not any(p for _, _, p in drive(StepThrottle(10.0, 0.3), 20, 0.1))
    sent = drive(StepThrottle(10.0, 0.3, previews=True), 20, 0.1)
    assert len(sent) == 20  # 10 per s allows every step here
    with_preview = [k for _, k, p in sent if p]
    assert with_preview == [1, 4, 7, 10, 13, 16, 19]
    # previews ride on step events: a throttled step never carries one
    sparse = drive(StepThrottle(1.0, 0.1, previews=True), 10, 0.25)
    assert all(p for _, _, p in sparse)


def test_throttle_refuses_bad_rates() -> None:
    with pytest.raises(ValueError):
        StepThrottle(0.0, 1.0)
    with pytest.raises(ValueError):
        StepThrottle(1.0, 0.0)


def test_sd_latents_map_to_colours_with_the_published_factors() -> None:
    # a latent that is channel 0 only: the first factor row, scaled to [0, 255]
    latents = torch.zeros((2, 4, 8, 6))
    latents[0, 0] = 1.0
    latents[1, 3] = 1.0
    a, b = latents_to_rgb(latents, 64)
    assert a.shape == (8, 6, 3) and a.dtype == np.uint8
    factors = np.array(LINEAR_MAPS[4][0], dtype=np.float32)
    np.testing.assert_array_equal(a[0, 0], np.round((factors[0] + 1) / 2 * 255).astype(np.uint8))
    np.testing.assert_array_equal(b[3, 5], np.round((factors[3] + 1) / 2 * 255).astype(np.uint8))
    # channel 3 is the dark one in SD's latent space: more of it is darker
    assert int(b.sum()) < int(a.sum())


def test_preview_is_downscaled_to_max_side_keeping_aspect() -> None:
    latents = torch.randn((1, 4, 64, 32), generator=torch.Generator().manual_seed(0))
    (img,) = latents_to_rgb(latents, 16)
    assert img.shape == (16, 8, 3)
    # area averaging commutes with the linear map: the same as mapping then averaging 4x4
    factors = torch.tensor(LINEAR_MAPS[4][0])
    full = torch.einsum("nchw,ck->nhwk", latents, factors)[0]
    pooled = full.reshape(16, 4, 8, 4, 3).mean(dim=(1, 3))
    expected = ((pooled.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).numpy()
    assert np.abs(img.astype(int) - expected.astype(int)).max() <= 1
    assert preview_size(64, 32, 200) == (64, 32)  # never upscaled
    assert preview_size(3, 1000, 64) == (1, 64)


def test_other_channel_counts_use_the_first_three_channels_stretched() -> None:
    latents = torch.zeros((1, 16, 4, 4))
    latents[0, 0] = torch.arange(16.0).reshape(4, 4) * 10  # any scale
    latents[0, 1] = -5.0  # flat: mid-grey
    latents[0, 2, 0, 0] = 1.0
    (img,) = latents_to_rgb(latents, 64)
    assert img[0, 0, 0] == 0 and img[3, 3, 0] == 255
    assert (img[..., 1] == 128).all()
    assert img[0, 0, 2] == 255 and img[1, 1, 2] == 0
    (two,) = latents_to_rgb(torch.ones((1, 2, 4, 4)), 64)  # fewer than 3: repeated
    assert two.shape == (4, 4, 3)
    with pytest.raises(ValueError):
        latents_to_rgb(torch.zeros((4, 8, 8)), 64)


def test_encoded_preview_is_a_jpeg_of_its_declared_size_under_the_bound() -> None:
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the worst case for JPEG
    for bound in (64 * 1024, 4096, 1500):
        preview = encode_preview(noisy, bound)
        assert preview is not None
        assert len(preview.data) <= bound
        with Image.open(io.BytesIO(preview.data)) as img:
            assert img.format == "JPEG"
            assert (img.width, img.height) == (preview.width, preview.height)
    assert encode_preview(noisy, 64 * 1024).width == 64  # type: ignore[union-attr]
    assert encode_preview(noisy, 1500).width < 64  # type: ignore[union-attr]
    assert encode_preview(noisy, 100) is None  # no JPEG is that small: dropped


class Runner:
    """Stand-in models for every stage (img2img included); counts UNet calls."""

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        x = call.inputs
        if call.model == "encode_prompt":
            return {"text_embeds": np.ones((x["prompt"].shape[0], 77, 64), np.float32)}
        if call.model == "vae_encoder":
            f = INFO.vae_scale_factor
            _, _, h, w = x["image"].shape
            return {"latent_mean": np.zeros((1, 4, h // f, w // f), np.float32)}
        if call.model == "unet":
            return {"noise_pred": x["sample"] * 0.1}
        return {"image": np.zeros((x["latent"].shape[0], 3, 64, 64), np.float32)}


async def test_on_step_counts_the_denoising_steps_actually_run() -> None:
    seen: list[tuple[int, int, int]] = []

    def on_step(job: Any, k: int, n: int) -> None:
        seen.append((k, n, int(job.latents.shape[0])))

    t2i = GenerationRequest(prompt="x", steps=6, scheduler="euler", num_images=2, guidance_scale=7)
    await run_job(start_job(t2i, INFO), Runner(), on_step=on_step)
    # guidance doubles the UNet rows, not the job's latents: one row per image
    assert seen == [(k, 6, 2) for k in range(1, 7)]
    seen.clear()
    i2i = GenerationRequest(
        prompt="x", steps=10, strength=0.5, scheduler="ddim", init_image=png(64, 64)
    )
    await run_job(start_job(i2i, INFO), Runner(), on_step=on_step)
    assert seen == [(k, 5, 1) for k in range(1, 6)]
    seen.clear()
    await run_job(start_job(t2i, INFO), Runner())  # no hook: nothing called
    assert seen == []


@dataclasses.dataclass
class Recorder:
    """A publisher that keeps what it is offered."""

    offered: list[tuple[ProgressEventRecord, list[Any], tuple[Any, ...]]] = dataclasses.field(
        default_factory=list
    )

    def offer(self, event: ProgressEventRecord, headers: Any, images: Any = ()) -> bool:
        self.offered.append((event, list(headers), tuple(images)))
        return True


async def test_reporter_sends_the_life_of_a_job_in_order() -> None:
    settings = Settings(progress_step_events_per_s=1000.0, preview_interval_s=0.000001)
    recorder = Recorder()
    reporter = ProgressReporter(recorder, settings)  # type: ignore[arg-type]
    reporter.step_events_per_s = 1e9  # steps here are microseconds apart: send every one
    request = GenerationRequest(
        prompt="x", steps=3, scheduler="euler", request_id="r-1", preview=True, num_images=2
    )
    job = start_job(request, INFO)
    reporter.queued(request, "corr-1")
    reporter.started(request, job.total_unet_calls)
    await run_job(job, Runner(), on_step=reporter.on_step)
    reporter.event(request, JobEvent.FINISHED)
    events = [e for e, _, _ in recorder.offered]
    assert [e.event for e in events] == ["queued", "started", "step", "step", "step", "finished"]
    assert [(e.step, e.steps) for e in events[2:5]] == [(1, 3), (2, 3), (3, 3)]
    assert all(e.request_id == "r-1" for e in events)
    assert all((CORRELATION_ID_HEADER, b"corr-1") in h for _, h, _ in recorder.offered)
    for _, _, images in recorder.offered[2:5]:
        assert len(images) == 2 and images[0].shape == (16, 16, 3)  # 64 px / f=4
    assert reporter._jobs == {}  # forgotten at its terminal event
    # a job never queued (refused at once) still gets its failed event, with its reason
    other = GenerationRequest(prompt="x", request_id="r-2")
    reporter.event(other, JobEvent.FAILED, correlation="c-2", reason="invalid_request")
    failed = recorder.offered[-1][0]
    assert (failed.event, failed.reason) == ("failed", "invalid_request")


async def test_publisher_drops_and_counts_instead_of_waiting() -> None:
    """A full queue and a broker nobody listens on: offer() returns at once, every event ends
    counted as dropped, none as published (no broker needed: the connection is refused)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics()
    publisher = ProgressPublisher(
        KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"),
        "progress",
        AvroCodec(),
        metrics,
        queue_size=2,
        send_timeout_s=1.0,
        flush_timeout_s=2.0,
    )
    event = ProgressEventRecord(request_id="r", event="step", timestamp_ms=0)
    assert not publisher.offer(event, [])  # not started: dropped, not queued
    await publisher.start()
    t0 = time.perf_counter()
    offered = [publisher.offer(event, []) for _ in range(5)]
    assert time.perf_counter() - t0 < 0.05
    assert offered == [True, True, False, False, False]
    await publisher.stop()
    assert publisher.dropped["queue_full"] == 3 and publisher.dropped["unavailable"] == 3
    assert sum(publisher.published.values()) == 0
    value = metrics.registry.get_sample_value(
        "orchestrator_progress_dropped_total", {"reason": "queue_full"}
    )
    assert value == 3
