"""No request lost: crashes, Triton outages, rebalances, poison input and overload.

Every test drives real processes (Tansu, tritonserver, the service in-process or as a child
process) and prints the figures it measured; run with `pytest -s -m faults` to see them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import io
import logging
import math
import os
import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.kafka_broker import create_topics
from orchestrator.adapters.triton_server import TritonServer, free_port
from orchestrator.client import Answer, Client
from orchestrator.domain import GenerationRequest
from tests.integration.fault_harness import (
    ServiceProcess,
    ServiceTask,
    aget,
    rss_kib,
    sampling,
    scrape,
)
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = [pytest.mark.integration, pytest.mark.faults]


# -- shared helpers ---------------------------------------------------------------------------


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until true; returns the seconds it took, fails loudly on timeout."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def wait_all(client: Client, ids: list[str], timeout: float) -> dict[str, Answer]:
    try:
        answers = await asyncio.gather(*(client.wait(rid, timeout) for rid in ids))
    except TimeoutError:
        missing = [rid for rid in ids if rid not in client.watcher.answered]
        raise AssertionError(
            f"{len(missing)} of {len(ids)} never answered: {missing[:10]}"
        ) from None
    return {a.request_id: a for a in answers}


async def send_all(client: Client, requests: list[GenerationRequest]) -> list[str]:
    return list(await asyncio.gather(*(client.send(r) for r in requests)))


def png_bytes(seed: int, w: int = 64, h: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def text_requests(prefix: str, n: int, steps: int) -> list[GenerationRequest]:
    schedulers = ["euler", "ddim", "pndm", "dpmpp_2m"]
    return [
        GenerationRequest(
            prompt=f"{prefix} number {i}",
            seed=i,
            steps=steps,
            scheduler=schedulers[i % len(schedulers)],
            request_id=f"{prefix}-{i}",
        )
        for i in range(n)
    ]


# -- 1. SIGKILL the service three times ---------------------------------------------------------


async def test_service_sigkilled_three_times_loses_no_request(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    settings_ = make_settings(kafka, triton, tracing=False, max_in_flight=16)
    await create_topics(
        settings_.bootstrap_servers,
        [settings_.request_topic, settings_.response_topic, settings_.dlq_topic],
        partitions=2,
    )
    rng = random.Random(0xC0FFEE)
    requests = text_requests("crash", 200, steps=2)
    proc = ServiceProcess(settings_, tmp_path / "serve.log")
    started = time.monotonic()
    kills: list[tuple[int, float, int]] = []
    try:
        async with client_for(settings_) as client:
            proc.start()
            sender = asyncio.create_task(send_all(client, requests))
            for _ in range(3):
                await proc.wait_ready()
                base = len(client.watcher.answered)
                target = min(base + rng.randint(5, 40), len(requests) - 1)

                def reached(t: int = target) -> bool:
                    return len(client.watcher.answered) >= t or not proc.alive()

                await wait_until(
                    reached,
                    120,
                    f"answers to reach {target} before a kill",
                )
                assert proc.alive(), "the service died on its own:\n" + proc.log_tail()
                pause = rng.uniform(0.0, 0.5)
                await asyncio.sleep(pause)
                answered = len(client.watcher.answered)
                pid = proc.pid
                proc.kill()
                kills.append((pid, time.monotonic() - started, answered))
                print(
                    f"[crash] SIGKILL pid {pid} at {time.monotonic() - started:.1f} s "
                    f"with {answered}/{len(requests)} answered"
                )
                proc.start()
            ids = await sender
            await proc.wait_ready()
            answers = await wait_all(client, ids, 180)
            await asyncio.sleep(2.0)  # late duplicates of redelivered records would land now
            duplicates = dict(client.watcher.duplicates)
            code = await proc.terminate()
    finally:
        proc.kill()
    elapsed = time.monotonic() - started
    ok = sum(1 for a in answers.values() if a.ok)
    dead = [a for a in answers.values() if not a.ok]
    print(
        f"[crash] {len(requests)} requests, {len(kills)} SIGKILLs, all accounted for in "
        f"{elapsed:.1f} s: {ok} answered, {len(dead)} dead-lettered, "
        f"{sum(duplicates.values())} duplicate answers seen by the client "
        f"({len(duplicates)} ids), final instance exit code {code}"
    )
    assert len(kills) == 3
    assert set(answers) == {r.request_id for r in requests}, "a request was lost"
    assert not dead, [a.reason for a in dead[:5]]
    assert code == 0, proc.log_tail()


# -- 2 and 3. Triton outages (a Triton of this module's own) ------------------------------------


@pytest.fixture(scope="module")
def own_triton(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A tritonserver only these tests kill, on fixed ports reused across restarts."""
    with TritonServer(
        tiny_models / "repository",
        work_dir=tmp_path_factory.mktemp("own-triton"),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        startup_timeout=180,
    ) as server:
        yield server


def kill_triton(server: TritonServer) -> None:
    """SIGKILL the server and its Python-backend stubs (its whole session)."""
    assert server.pid is not None, "tritonserver is not running"
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()


async def restart_triton(server: TritonServer) -> float:
    t0 = time.monotonic()
    server.start()
    await asyncio.to_thread(server.wait_ready, 180)
    return time.monotonic() - t0


async def test_triton_killed_mid_run_and_restarted_every_request_answered(
    kafka: Any, own_triton: TritonServer
) -> None:
    settings_ = make_settings(kafka, own_triton, max_in_flight=8)
    rng = random.Random(7)
    requests = text_requests("tkill", 60, steps=4)
    async with running_service(settings_) as service, client_for(settings_) as client:
        ids = [await client.send(r) for r in requests]
        await wait_until(lambda: len(client.watcher.answered) >= 5, 120, "first answers")
        answered_at_kill = len(client.watcher.answered)
        kill_triton(own_triton)
        t_kill = time.monotonic()
        down_s = rng.uniform(5.0, 10.0)
        await asyncio.sleep(down_s)
        restart_s = await restart_triton(own_triton)
        outage = time.monotonic() - t_kill
        answers = await wait_all(client, ids, 240)
        metrics = await scrape(service.http.port)
        stats = service.stats
    retries = metrics.total("orchestrator_retries_total")
    errors = metrics.total("orchestrator_triton_errors_total")
    dead = [a for a in answers.values() if not a.ok]
    print(
        f"[triton-kill] killed with {answered_at_kill}/{len(ids)} answered; down {down_s:.1f} s "
        f"+ restart {restart_s:.1f} s = outage {outage:.1f} s; all {len(answers)} accounted for, "
        f"{len(dead)} dead-lettered; orchestrator_retries_total={retries:.0f}, "
        f"orchestrator_triton_errors_total={errors:.0f}, stats.retries={stats.retries}"
    )
    assert not dead, [a.reason for a in dead[:5]]
    assert len(answers) == len(ids)
    assert retries > 0 or errors > 0, "the outage left no trace in the metrics"
    assert stats.dead_lettered == 0


async def test_triton_down_past_retry_budget_pauses_then_completes(
    kafka: Any, own_triton: TritonServer
) -> None:
    settings_ = make_settings(
        kafka,
        own_triton,
        max_in_flight=8,
        retry_attempts_per_call=2,
        retry_initial_backoff_s=0.1,
        retry_max_backoff_s=0.5,
        breaker_failure_threshold=2,
        breaker_probe_interval_s=0.5,
    )
    async with running_service(settings_) as service, client_for(settings_) as client:
        port = service.http.port
        status, _ = await aget(port, "/readyz")
        assert status == 200, "not ready before the outage"
        before = [await client.send(r) for r in text_requests("down-a", 8, steps=4)]
        await wait_until(lambda: len(client.watcher.answered) >= 1, 120, "a first answer")
        kill_triton(own_triton)
        t_kill = time.monotonic()
        during = [await client.send(r) for r in text_requests("down-b", 12, steps=2)]

        paused_seen = 0.0
        readyz_codes: list[int] = []

        async def paused() -> bool:
            nonlocal paused_seen
            m = await scrape(port)
            paused_seen = max(
                paused_seen, m.total("orchestrator_consumption_paused", cause="triton_down")
            )
            readyz_codes.append((await aget(port, "/readyz"))[0])
            return paused_seen == 1 and readyz_codes[-1] == 503

        deadline_s = time.monotonic() + 30
        while not await paused():
            assert time.monotonic() < deadline_s, "consumption never paused for triton_down"
            await asyncio.sleep(0.2)
        paused_after = time.monotonic() - t_kill
        short = GenerationRequest(
            prompt="too late",
            seed=1,
            steps=2,
            request_id="down-deadline",
            deadline=time.time() + 3.0,
        )
        await client.send(short)
        # stay down well past the retry budget (2 attempts x <= 0.5 s backoff) and the deadline
        while time.monotonic() - t_kill < 8.0:
            await paused()
            await asyncio.sleep(0.3)
        dead_while_down = {rid: a.reason for rid, a in client.watcher.answered.items() if not a.ok}
        assert service.stats.dead_letters_by_reason.get("inference_unavailable", 0) == 0
        restart_s = await restart_triton(own_triton)
        outage = time.monotonic() - t_kill
        answers = await wait_all(client, [*before, *during, short.request_id], 240)
        after = await scrape(port)
        status_after, _ = await aget(port, "/readyz")
        reasons = dict(service.stats.dead_letters_by_reason)
    print(
        f"[triton-down] paused {paused_after:.1f} s after the kill; "
        f"orchestrator_consumption_paused{{cause=triton_down}} max {paused_seen:.0f}; /readyz "
        f"while down {collections.Counter(readyz_codes)}; outage {outage:.1f} s "
        f"(restart {restart_s:.1f} s); dead letters while down {dead_while_down}; "
        f"after: {reasons}; retries {after.total('orchestrator_retries_total'):.0f}, "
        f"triton errors {after.total('orchestrator_triton_errors_total'):.0f}, "
        f"circuit openings {service.breaker.openings}"
    )
    assert paused_seen == 1
    assert 503 in readyz_codes
    for rid in [*before, *during]:
        assert answers[rid].ok, (rid, answers[rid].reason)
    late = answers[short.request_id]
    assert not late.ok and late.failure is not None
    assert late.failure["reason"] == "deadline_exceeded", late.reason
    assert reasons == {"deadline_exceeded": 1}
    assert after.total("orchestrator_consumption_paused", cause="triton_down") == 0
    assert status_after == 200


# -- 4. Rebalance: one instance joins, one leaves -----------------------------------------------


async def test_rebalance_join_and_leave_mid_run_answers_everything(
    kafka: Any, triton: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator")
    settings_ = make_settings(kafka, triton, tracing=False, max_in_flight=8)
    await create_topics(
        settings_.bootstrap_servers,
        [settings_.request_topic, settings_.response_topic, settings_.dlq_topic],
        partitions=4,
    )
    requests = text_requests("rebal", 150, steps=3)
    first, second = ServiceTask(settings_), ServiceTask(settings_)
    started = time.monotonic()
    try:
        async with client_for(settings_) as client:
            await first.start()
            sender = asyncio.create_task(send_all(client, requests))
            await wait_until(lambda: len(client.watcher.answered) >= 15, 120, "15 answers")
            joined_at = len(client.watcher.answered)
            await second.start()
            await wait_until(
                lambda: (
                    second.service.stats.answered >= 10
                    or len(client.watcher.answered) >= len(requests)
                ),
                120,
                "the second instance to take a share",
            )
            left_at = len(client.watcher.answered)
            await first.stop()
            ids = await sender
            answers = await wait_all(client, ids, 240)
            await asyncio.sleep(1.5)
            duplicates = dict(client.watcher.duplicates)
            a_stats, b_stats = first.service.stats, second.service.stats
            assert second.task is not None and not second.task.done()
    finally:
        for inst in (first, second):
            if inst.task is not None and not inst.task.done():
                await inst.stop()
    commit_failures = [r for r in caplog.records if "commit failed" in r.getMessage()]
    print(
        f"[rebalance] {len(requests)} requests in {time.monotonic() - started:.1f} s; second "
        f"joined at {joined_at} answered, first left at {left_at}; first answered "
        f"{a_stats.answered}, second {b_stats.answered}; duplicates seen by client "
        f"{sum(duplicates.values())} (answer-cache re-publications: first "
        f"{a_stats.duplicates}, second {b_stats.duplicates}); 'commit failed' warnings "
        f"{len(commit_failures)}"
    )
    assert len(answers) == len(requests)
    assert all(a.ok for a in answers.values()), [a.reason for a in answers.values() if not a.ok]
    assert a_stats.answered > 0 and b_stats.answered > 0
    assert len(commit_failures) <= 10, [r.getMessage() for r in commit_failures[:5]]


# -- 5. Poison input (hypothesis) ---------------------------------------------------------------

POISON_LIMITS: dict[str, Any] = {
    "max_steps": 4,
    "max_width": 64,
    "max_height": 64,
    "max_num_images": 2,
    "max_prompt_chars": 1000,
    "max_init_image_bytes": 4096,
    "max_request_bytes": 32 * 1024,
}
KNOWN_SCHEMA_IDS = {1, 2, 3, 4}
_codec = AvroCodec()


@dataclasses.dataclass(frozen=True)
class Poison:
    kind: str
    #: request to encode (its request_id is set at send time), or raw bytes
    request: GenerationRequest | None = None
    raw: bytes | None = None
    #: how to spoil the encoded request: ("truncate", n) ("trail", bytes) ("schema", id)
    spoil: tuple[str, Any] | None = None
    #: allowed dead-letter reasons; empty: must be answered
    reasons: frozenset[str] = frozenset()

    def value(self, rid: str) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.request is not None
        encoded = _codec.encode_request(dataclasses.replace(self.request, request_id=rid))
        if self.spoil is None:
            return encoded
        how, arg = self.spoil
        if how == "truncate":
            return encoded[: arg % len(encoded)]
        if how == "trail":
            return encoded + arg
        if how == "schema":
            return struct.pack(">bI", 0, arg) + encoded[5:]
        raise AssertionError(how)


MALFORMED = frozenset({"malformed_record"})
INVALID = frozenset({"invalid_request"})

good_requests = st.builds(
    GenerationRequest,
    prompt=st.text(max_size=30).map(lambda s: "p " + s),
    negative_prompt=st.text(max_size=10),
    seed=st.integers(0, 2**63 - 1),
    steps=st.integers(1, 2),
    scheduler=st.sampled_from(["euler", "ddim", "pndm", "dpmpp_2m", "euler_a", "lms"]),
    guidance_scale=st.floats(0.0, 15.0),
    width=st.sampled_from([None, 32, 64]),
    height=st.sampled_from([None, 32, 64]),
    metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=2),
)

_bad_field = st.one_of(
    st.integers(-5, 0).map(lambda v: {"steps": v}),
    st.integers(5, 10_000).map(lambda v: {"steps": v}),
    st.sampled_from([0, -8, 7, 63, 72, 8192]).map(lambda v: {"width": v}),
    st.sampled_from([0, -8, 5, 100, 4096]).map(lambda v: {"height": v}),
    st.integers(-3, 0).map(lambda v: {"num_images": v}),
    st.integers(3, 1000).map(lambda v: {"num_images": v}),
    st.integers(-(2**63), -1).map(lambda v: {"seed": v}),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 100.5]).map(
        lambda v: {"guidance_scale": v}
    ),
    st.text(min_size=1, max_size=12).map(lambda s: {"scheduler": "no-such-" + s}),
    st.text(alphabet=" \t\n", max_size=5).map(lambda s: {"prompt": s}),
    st.integers(1001, 3000).map(lambda n: {"negative_prompt": "n" * n}),
    st.binary(min_size=1, max_size=64).map(lambda b: {"init_image": b"GIF89a" + b}),
    st.just({"init_image": b""}),
)


@st.composite
def poison_records(draw: st.DrawFn) -> Poison:
    base = draw(good_requests)
    kind = draw(
        st.sampled_from(
            [
                "good",
                "good",
                "good",
                "bad_magic",
                "short",
                "unknown_schema",
                "wrong_type",
                "truncated",
                "trailing",
                "out_of_range",
                "out_of_range",
                "out_of_range",
                "huge_prompt",
                "big_init_image",
                "past_deadline",
            ]
        )
    )
    if kind == "good":
        return Poison(kind, request=base)
    if kind == "bad_magic":
        raw = draw(st.binary(min_size=1, max_size=64).filter(lambda b: b[0] != 0))
        return Poison(kind, raw=raw, reasons=MALFORMED)
    if kind == "short":
        return Poison(
            kind,
            raw=draw(
                st.sampled_from([b"", b"\x00"]) | st.binary(max_size=3).map(lambda b: b"\x00" + b)
            ),
            reasons=MALFORMED,
        )
    if kind == "unknown_schema":
        sid = draw(st.integers(0, 2**32 - 1).filter(lambda i: i not in KNOWN_SCHEMA_IDS))
        return Poison(
            kind, request=base, spoil=("schema", sid), reasons=frozenset({"unknown_schema"})
        )
    if kind == "wrong_type":
        # valid Avro framed with the id of another record type (the result), or with a retired
        # id (the failure record's, 4: never read again)
        sid = draw(st.sampled_from([3, 4]))
        reasons = MALFORMED if sid == 3 else frozenset({"unknown_schema"})
        return Poison(kind, request=base, spoil=("schema", sid), reasons=reasons)
    if kind == "truncated":
        return Poison(
            kind, request=base, spoil=("truncate", draw(st.integers(0, 10_000))), reasons=MALFORMED
        )
    if kind == "trailing":
        return Poison(
            kind,
            request=base,
            spoil=("trail", draw(st.binary(min_size=1, max_size=16))),
            reasons=MALFORMED,
        )
    if kind == "out_of_range":
        return Poison(kind, request=dataclasses.replace(base, **draw(_bad_field)), reasons=INVALID)
    if kind == "huge_prompt":
        n = draw(st.integers(POISON_LIMITS["max_prompt_chars"] + 1, 60_000))
        request = dataclasses.replace(base, prompt="x" * n)
        too_big = n > POISON_LIMITS["max_request_bytes"] - 200
        near = abs(n - POISON_LIMITS["max_request_bytes"]) < 400
        reasons = {"record_too_large"} if too_big else {"invalid_request"}
        if near:
            reasons = {"record_too_large", "invalid_request"}
        return Poison(kind, request=request, reasons=frozenset(reasons))
    if kind == "big_init_image":
        n = draw(st.integers(POISON_LIMITS["max_init_image_bytes"] + 1, 20_000))
        image = png_bytes(n, 16, 16)
        image += b"\x00" * (n - len(image))  # a real PNG padded past the limit
        return Poison(kind, request=dataclasses.replace(base, init_image=image), reasons=INVALID)
    if kind == "past_deadline":
        ago = draw(st.floats(1.0, 1e6))
        return Poison(
            kind,
            request=dataclasses.replace(base, deadline=time.time() - ago),
            reasons=frozenset({"deadline_exceeded"}),
        )
    raise AssertionError(kind)


def draw_poison(n: int) -> list[Poison]:
    """n records drawn by hypothesis, deterministically (derandomized, no example database)."""
    drawn: list[Poison] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(poison_records())
    def collect(record: Poison) -> None:
        drawn.append(record)

    collect()
    return drawn


async def test_poison_fuzz_every_bad_record_dead_lettered_service_survives(
    kafka: Any, triton: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator")
    records = draw_poison(300)
    assert len(records) >= 250, f"hypothesis drew only {len(records)} records"
    settings_ = make_settings(kafka, triton, tracing=False, max_in_flight=16, **POISON_LIMITS)
    await create_topics(
        settings_.bootstrap_servers,
        [settings_.request_topic, settings_.response_topic, settings_.dlq_topic],
        partitions=2,
    )
    inst = ServiceTask(settings_)
    started = time.monotonic()
    try:
        service = await inst.start()
        task = inst.task
        async with client_for(settings_, max_record_bytes=1024 * 1024) as client:
            ids = []
            for i, rec in enumerate(records):
                rid = f"fuzz-{i:04d}-{rec.kind}"
                await client.send_raw(rec.value(rid), rid, key=rid.encode())
                ids.append(rid)
            answers = await wait_all(client, ids, 300)
        health, _ = await aget(service.http.port, "/healthz")
        assert inst.task is task and task is not None
        alive = not task.done()
    finally:
        await inst.stop()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    wrong = []
    for rid, rec in zip(ids, records, strict=True):
        a = answers[rid]
        outcome = "answered" if a.ok else (a.failure or {}).get("reason", "?")
        by_kind[rec.kind][outcome] += 1
        if rec.reasons:
            if a.ok or outcome not in rec.reasons:
                wrong.append((rid, sorted(rec.reasons), a.reason or "answered"))
        elif not a.ok:
            wrong.append((rid, "answered", a.reason))
        if not a.ok:
            assert a.failure is not None and a.failure["message"], rid
    unexpected = [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    print(
        f"[poison] {len(records)} records in {time.monotonic() - started:.1f} s; by kind: "
        + "; ".join(f"{k} {dict(v)}" for k, v in sorted(by_kind.items()))
        + f"; service stats: answered {service.stats.answered}, dead-lettered "
        f"{service.stats.dead_lettered} {dict(service.stats.dead_letters_by_reason)}; "
        f"/healthz {health}; task alive {alive}"
    )
    assert not wrong, wrong[:10]
    assert alive, "the service task ended"
    assert health == 200
    assert not unexpected, [r.getMessage() for r in unexpected[:3]]
    n_bad = sum(1 for r in records if r.reasons)
    assert service.stats.dead_lettered == n_bad
    assert 0 < n_bad < len(records)


# -- 6. Overload: ten times the in-flight bound at once ------------------------------------------


async def test_burst_of_ten_times_the_bound_keeps_memory_and_in_flight_bounded(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    bound, burst, max_bytes = 4, 40, 48 * 1024
    settings_ = make_settings(
        kafka, triton, tracing=False, max_in_flight=bound, max_buffered_bytes=max_bytes
    )
    await create_topics(
        settings_.bootstrap_servers,
        [settings_.request_topic, settings_.response_topic, settings_.dlq_topic],
        partitions=2,
    )
    requests = [
        GenerationRequest(
            prompt=f"burst {i}",
            seed=i,
            steps=4,
            strength=0.75,
            scheduler="euler",
            init_image=png_bytes(i),
            request_id=f"burst-{i}",
        )
        for i in range(burst)
    ]
    record_size = max(len(AvroCodec().encode_request(r)) for r in requests)
    proc = ServiceProcess(settings_, tmp_path / "serve.log")
    rss: list[int] = []
    in_flight: list[float] = []
    buffered: list[float] = []
    paused_causes: collections.Counter[str] = collections.Counter()
    try:
        proc.start()
        port = await proc.wait_ready()
        async with client_for(settings_) as client:
            await asyncio.sleep(1.0)
            baseline = max(rss_kib(proc.pid) for _ in range(5))

            async def sample_metrics() -> None:
                m = await scrape(port)
                in_flight.append(m.total("orchestrator_jobs_in_flight"))
                buffered.append(m.total("orchestrator_buffered_bytes"))
                for labels, value in m.samples.get("orchestrator_consumption_paused", {}).items():
                    if value:
                        paused_causes[dict(labels)["cause"]] += 1

            started = time.monotonic()
            async with (
                sampling(0.05, lambda: rss.append(rss_kib(proc.pid))),
                sampling(0.1, sample_metrics),
            ):
                ids = list(await asyncio.gather(*(client.send(r) for r in requests)))
                answers = await wait_all(client, ids, 240)
            elapsed = time.monotonic() - started
        code = await proc.terminate()
    finally:
        proc.kill()
    peak = max(rss)
    print(
        f"[overload] {burst} requests ({record_size} B each) at once, max_in_flight {bound}, "
        f"max_buffered_bytes {max_bytes}: done in {elapsed:.1f} s; service RSS baseline "
        f"{baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (+{(peak - baseline) / 1024:.1f} "
        f"MiB, {len(rss)} samples); in flight sampled max {max(in_flight):.0f} "
        f"({len(in_flight)} scrapes); buffered bytes sampled max {max(buffered):.0f}; "
        f"paused samples by cause {dict(paused_causes)}"
    )
    assert all(a.ok for a in answers.values()), [a.reason for a in answers.values() if not a.ok]
    assert len(answers) == burst
    assert max(in_flight) <= bound
    assert max(buffered) <= max_bytes + bound * record_size
    assert paused_causes, "consumption never paused under a burst of 10x the bound"
    assert peak - baseline < 200 * 1024, "resident memory grew by more than 200 MiB"
    assert code == 0, proc.log_tail()
