"""The client side of a job's life: the Python API (`submit`/`watch` handles, `cancel`) and the
`orchestrator submit/cancel/watch` commands, against a real Tansu broker.

The first tests play the service by hand (progress events, answers and dead letters produced
with the codec), so they check the client alone; the last ones run the real service in-process
(real tritonserver, tiny models) and the commands as child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.trace import TracerProvider

from orchestrator.adapters.avro import (
    OUTCOME_CANCELLED,
    OUTCOME_SUCCEEDED,
    AvroCodec,
    GenerationResultRecord,
    ImageRecord,
    ProgressEventRecord,
)
from orchestrator.adapters.child_process import GroupGuard
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_REASON,
    KafkaProducerAdapter,
    header_str,
)
from orchestrator.adapters.kafka_broker import create_topics
from orchestrator.client import Client
from orchestrator.config import Settings, load_settings
from orchestrator.domain import GenerationRequest
from tests.integration.service_harness import make_settings, running_service

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"


def topic_settings(kafka: Any, **overrides: Any) -> Settings:
    """Settings with a topic set of this test's own (every topic: progress and control too)."""
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "request_topic": f"req-{tag}",
        "response_topic": f"resp-{tag}",
        "dlq_topic": f"dlq-{tag}",
        "progress_topic": f"prog-{tag}",
        "control_topic": f"ctl-{tag}",
        "group_id": f"group-{tag}",
    }
    return load_settings(None, **{**base, **overrides})


async def with_topics(settings: Settings) -> Settings:
    await create_topics(settings.bootstrap_servers, settings.service_topics(), partitions=3)
    return settings


class FakeService:
    """Produces what the service would: progress events, answers, dead letters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = AvroCodec()
        self.producer = KafkaProducerAdapter(settings.kafka("-fake"))

    async def __aenter__(self) -> FakeService:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        await self.codec.aclose()

    async def event(self, event: ProgressEventRecord) -> None:
        await self.raw_progress(event.request_id, self.codec.encode_progress(event))

    async def raw_progress(self, request_id: str, value: bytes) -> None:
        await self.producer.publish(
            self.settings.progress_topic,
            value,
            key=request_id.encode(),
            headers=[(CORRELATION_ID_HEADER, request_id.encode())],
        )

    async def answer(self, request_id: str, outcome: str = OUTCOME_SUCCEEDED) -> None:
        images = () if outcome == OUTCOME_CANCELLED else (ImageRecord(0, 8, 8, png=PNG),)
        result = GenerationResultRecord(request_id, images, seed=1, outcome=outcome)
        await self.producer.publish(
            self.settings.response_topic,
            self.codec.encode_result(result),
            key=request_id.encode(),
            headers=[(CORRELATION_ID_HEADER, request_id.encode())],
        )

    async def dead_letter(self, request_id: str, reason: str, message: str) -> None:
        request = GenerationRequest(prompt="x", request_id=request_id)
        await self.producer.publish(
            self.settings.dlq_topic,
            self.codec.encode_request(request),
            key=request_id.encode(),
            headers=[
                (CORRELATION_ID_HEADER, request_id.encode()),
                (DLQ_ERROR_REASON, reason.encode()),
                (DLQ_ERROR_MESSAGE, message.encode()),
            ],
        )


def ev(rid: str, event: str, step: int = 0, steps: int = 0, **kw: Any) -> ProgressEventRecord:
    return ProgressEventRecord(
        rid, event, int(time.time() * 1000), step, steps, elapsed_ms=10.0 * step, **kw
    )


async def collect(handle: Any, timeout: float = 30.0) -> list[ProgressEventRecord]:
    async def run() -> list[ProgressEventRecord]:
        return [e async for e in handle]

    return await asyncio.wait_for(run(), timeout)


async def read_control(settings: Settings, count: int, timeout: float = 30.0) -> list[Any]:
    """The first `count` records of the control topic."""
    consumer = AIOKafkaConsumer(
        settings.control_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < count:
            assert time.monotonic() < deadline, f"{len(records)} control records in {timeout} s"
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


# -- the Python API against the broker ------------------------------------------------------------


async def test_handle_yields_its_own_events_in_order_and_ends_at_the_terminal_one(
    kafka: Any,
) -> None:
    settings = await with_topics(topic_settings(kafka))
    mine = [
        ev("job-a", "queued", queue_position=2),
        ev("job-a", "started", 0, 5),
        *(ev("job-a", "step", k, 5) for k in range(1, 6)),
        ev("job-a", "finished", 5, 5),
    ]
    async with Client.from_settings(settings) as client, FakeService(settings) as fake:
        handle = client.watch("job-a")
        other = client.watch("job-b")
        for n, event in enumerate(mine):
            await fake.event(event)
            await fake.event(ev("job-b", "step", n + 1, 50))  # another request's, interleaved
            if n == 3:
                await fake.raw_progress("job-a", b"not avro")
        await fake.event(ev("job-a", "step", 9, 9))  # after the terminal one: never yielded
        got = await collect(handle)
        assert handle.last == mine[-1]
        # job-b had no terminal event: it ends when its answer arrives
        await fake.answer("job-b")
        got_b = await collect(other)
        assert client.progress is not None and client.progress.undecodable == 1
    assert got == mine
    assert [e.step for e in got_b[:-1]] == list(range(1, len(mine) + 1))
    assert {e.request_id for e in got_b} == {"job-b"}
    assert got_b[-1].event == "finished" and got_b[-1].message is not None


@pytest.mark.parametrize("outcome", ["succeeded", "cancelled", "dead_letter"])
async def test_events_end_with_the_answer_when_progress_events_were_dropped(
    kafka: Any, outcome: str
) -> None:
    settings = await with_topics(topic_settings(kafka))
    async with Client.from_settings(settings) as client, FakeService(settings) as fake:
        handle = await client.submit(GenerationRequest(prompt="x", steps=8, request_id="j-1"))
        await fake.event(ev("j-1", "started", 0, 8))
        await fake.event(ev("j-1", "step", 3, 8))
        # no terminal progress event: dropped, as progress may be
        if outcome == "dead_letter":
            await fake.dead_letter("j-1", "deadline_exceeded", "too late")
        else:
            await fake.answer("j-1", outcome)
        t0 = time.monotonic()
        events = await collect(handle)
        ended_after = time.monotonic() - t0
        answer = await handle.result(timeout=5)
    assert [e.event for e in events[:2]] == ["started", "step"]
    last = events[-1]
    assert len(events) == 3 and last.request_id == "j-1"
    assert ended_after < handle.grace_s + 5.0
    if outcome == "succeeded":
        assert answer.ok and not answer.cancelled
        assert (last.event, last.step, last.steps) == ("finished", 8, 8)
    elif outcome == "cancelled":
        assert answer.cancelled and not answer.ok and answer.result is not None
        assert answer.result.images == ()
        assert (last.event, last.step, last.steps) == ("cancelled", 3, 8)
    else:
        assert answer.result is None and answer.failure is not None
        assert (last.event, last.step) == ("failed", 3)
        assert (last.reason, last.message) == ("deadline_exceeded", "too late")


async def test_cancel_produces_a_control_command_keyed_by_request_id_and_waits(
    kafka: Any,
) -> None:
    settings = await with_topics(topic_settings(kafka))
    codec = AvroCodec()
    async with (
        Client.from_settings(settings, tracer_provider=TracerProvider()) as client,
        FakeService(settings) as fake,
    ):
        handle = client.watch("c-1")
        waiting = asyncio.create_task(handle.cancel("no longer wanted", wait=True, timeout=30))
        [record] = await read_control(settings, 1)
        assert not waiting.done()  # it waits for the answer
        await fake.answer("c-1", OUTCOME_CANCELLED)
        answer = await waiting
        # a second cancel, without waiting: idempotent for the service, another record here
        await client.cancel("c-2")
        records = await read_control(settings, 2)
    assert answer is not None and answer.cancelled and handle.cancel_sent
    assert record.key == b"c-1"
    headers = [(k, bytes(v)) for k, v in record.headers]
    assert header_str(headers, CORRELATION_ID_HEADER) == "c-1"
    assert header_str(headers, "traceparent"), "no trace context on the cancel"
    await codec.resolve(record.value)
    command = codec.decode_control(record.value)
    assert (command.command, command.request_id, command.reason) == (
        "cancel",
        "c-1",
        "no longer wanted",
    )
    assert abs(command.issued_ms / 1000 - time.time()) < 60
    # keyed by request id: each in its own partition's order, so found by key
    [other] = [r for r in records if r.key == b"c-2"]
    second = codec.decode_control(other.value)
    assert (second.request_id, second.reason) == ("c-2", None)
    await codec.aclose()


# -- the commands as child processes -------------------------------------------------------------


def exited(pid: int) -> bool:
    """True once our child `pid` has exited; it is left unreaped (its process group id stays
    ours until it is)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


class Command:
    """`python -m orchestrator ARGS` as a child process that dies with the test; its stdout and
    stderr in files, read while it runs.

    Not started with `spawn()`: its parent-death signal needs Python code run in the forked
    child (`preexec_fn`), and while the service runs in this process (gRPC threads) that child
    crashed (SIGSEGV in an at-fork handler, seen here). A plain fork-exec in a session of its
    own, with a GroupGuard that kills the session when this process dies, is safe."""

    def __init__(self, tmp_path: Path, settings: Settings, *args: str) -> None:
        self.name = f"{args[0]}-{uuid.uuid4().hex[:6]}"
        self.out = tmp_path / f"{self.name}.out"
        self.err = tmp_path / f"{self.name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env.update(
            {
                "ORCHESTRATOR_REQUEST_TOPIC": settings.request_topic,
                "ORCHESTRATOR_RESPONSE_TOPIC": settings.response_topic,
                "ORCHESTRATOR_DLQ_TOPIC": settings.dlq_topic,
                "ORCHESTRATOR_PROGRESS_TOPIC": settings.progress_topic,
                "ORCHESTRATOR_CONTROL_TOPIC": settings.control_topic,
                "ORCHESTRATOR_TRACING": "false",
            }
        )
        command = [sys.executable, "-m", "orchestrator", *args]
        command += ["--bootstrap-servers", settings.bootstrap_servers]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self.guard = GroupGuard(self.process.pid)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def show(self) -> str:
        return f"--- stdout\n{self.stdout()}--- stderr\n{self.stderr()}"

    async def wait_for(self, text: str, timeout: float = 60.0, *, err: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.stderr() if err else self.stdout()):
            assert not exited(self.process.pid), (
                f"{self.name} exited before {text!r}:\n{self.show()}"
            )
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{self.show()}"
            await asyncio.sleep(0.05)

    async def exit_code(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while not exited(self.process.pid):
            assert time.monotonic() < deadline, f"{self.name} still runs:\n{self.show()}"
            await asyncio.sleep(0.05)
        return self.stop()

    def stop(self) -> int:
        """Stop it if it runs (SIGTERM, then SIGKILL to its session), release the guard while
        the child is unreaped, then reap it; returns its exit code."""
        if self.process.returncode is None:
            if not exited(self.process.pid):
                os.kill(self.process.pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while not exited(self.process.pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.guard.release()
        return self.process.wait()


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
async def test_watch_command_prints_each_event_until_the_terminal_one(
    kafka: Any, tmp_path: Path, as_json: bool
) -> None:
    settings = await with_topics(topic_settings(kafka))
    events = [
        ev("w-1", "queued", queue_position=0),
        ev("w-1", "started", 0, 3),
        *(ev("w-1", "step", k, 3) for k in (1, 2, 3)),
        ev("w-1", "failed", 3, 3, reason="deadline_exceeded", message="too late"),
    ]
    flags = ["--timeout", "120", *(["--json"] if as_json else [])]
    watch = Command(tmp_path, settings, "watch", "w-1", *flags)
    try:
        await watch.wait_for("watching w-1", err=True)
        async with FakeService(settings) as fake:
            for event in events:
                await fake.event(ev("w-2", "step", 1, 2))
                await fake.event(event)
        code = await watch.exit_code()
    finally:
        watch.stop()
    lines = watch.stdout().splitlines()
    assert code == 1, watch.show()  # failed
    if as_json:
        got = [json.loads(line) for line in lines]
        assert [(g["event"], g["step"], g["request_id"]) for g in got] == [
            (e.event, e.step, "w-1") for e in events
        ]
        assert got[0]["queue_position"] == 0 and got[-1]["reason"] == "deadline_exceeded"
    else:
        assert lines == [
            "w-1: queued, 0 ahead",
            "w-1: started, 3 steps",
            "w-1: step 1 of 3 [0.0 s]",
            "w-1: step 2 of 3 [0.0 s]",
            "w-1: step 3 of 3 [0.0 s]",
            "w-1: failed: deadline_exceeded: too late [0.0 s]",
        ], watch.show()


async def test_cancel_command_produces_the_cancel_and_waits_for_the_answer(
    kafka: Any, tmp_path: Path
) -> None:
    settings = await with_topics(topic_settings(kafka))
    codec = AvroCodec()
    cancel = Command(tmp_path, settings, "cancel", "k-1", "--reason", "changed my mind", "--wait")
    try:
        await cancel.wait_for("cancel of k-1 sent")
        [record] = await read_control(settings, 1)
        async with FakeService(settings) as fake:
            await fake.answer("k-1", OUTCOME_CANCELLED)
        code = await cancel.exit_code()
    finally:
        cancel.stop()
    assert code == 0, cancel.show()
    assert "k-1 cancelled" in cancel.stdout()
    assert record.key == b"k-1"
    command = codec.decode_control(record.value)
    assert (command.command, command.request_id, command.reason) == (
        "cancel",
        "k-1",
        "changed my mind",
    )


@pytest.mark.parametrize("second", [True, False], ids=["second-ctrl-c", "cancel-timeout"])
async def test_ctrl_c_on_submit_sends_the_cancel_and_waits_bounded(
    kafka: Any, tmp_path: Path, second: bool
) -> None:
    """No service answers here: after Ctrl-C, submit waits for the cancelled answer until a
    second Ctrl-C or --cancel-timeout, and exits 130 either way."""
    settings = await with_topics(topic_settings(kafka))
    codec = AvroCodec()
    submit = Command(
        tmp_path,
        settings,
        "submit",
        *("--prompt", "x", "--request-id", "q-1", "--out", str(tmp_path / "q.png")),
        *("--cancel-timeout", "300" if second else "1"),
    )
    try:
        await submit.wait_for("submitted q-1")
        os.kill(submit.process.pid, signal.SIGINT)
        await submit.wait_for("cancelling q-1", err=True)
        [record] = await read_control(settings, 1)
        t0 = time.monotonic()
        if second:
            os.kill(submit.process.pid, signal.SIGINT)
        code = await submit.exit_code(30)
        took = time.monotonic() - t0
    finally:
        submit.stop()
    assert code == 130, submit.show()
    assert took < 10, took
    if second:
        assert "quitting without waiting" in submit.stderr()
    else:
        assert "no answer to the cancel of q-1 after 1 s" in submit.stderr()
    assert record.key == b"q-1"
    command = codec.decode_control(record.value)
    assert (command.command, command.request_id) == ("cancel", "q-1")
    assert command.reason and "interrupted" in command.reason


# -- end to end: the real service ------------------------------------------------------------------


def service_settings(kafka: Any, triton: Any, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return make_settings(
        kafka,
        triton,
        progress_topic=f"prog-{tag}",
        control_topic=f"ctl-{tag}",
        progress_step_events_per_s=1000.0,
        **overrides,
    )


async def test_submit_command_shows_progress_writes_previews_and_the_image(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    settings = service_settings(kafka, triton, preview_interval_s=0.001)
    out = tmp_path / "img.png"
    previews = tmp_path / "previews"
    async with running_service(settings):
        submit = Command(
            tmp_path,
            settings,
            "submit",
            *("--prompt", "a lighthouse", "--steps", "6", "--scheduler", "euler"),
            *("--request-id", "s-1"),
            *("--priority", "high", "--deadline-s", "300"),
            *("--out", str(out), "--preview-dir", str(previews)),
        )
        try:
            code = await submit.exit_code(180)
        finally:
            submit.stop()
    text = submit.stdout()
    assert code == 0, submit.show()
    assert "submitted s-1" in text
    assert "s-1: started, 6 steps" in text  # not a terminal: one line per event
    for k in (1, 6):
        assert f"s-1: step {k} of 6" in text, text
    assert "s-1: finished" in text
    assert str(out.resolve()) in text
    assert out.read_bytes().startswith(PNG)
    saved = sorted(p.name for p in previews.iterdir())
    assert saved and all(p.startswith("s-1-0-step") and p.endswith(".jpg") for p in saved)


async def test_watch_command_follows_a_request_submitted_by_another_process(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    settings = service_settings(kafka, triton)
    async with running_service(settings):
        watch = Command(tmp_path, settings, "watch", "o-1", "--timeout", "180")
        try:
            await watch.wait_for("watching o-1", err=True)
            async with Client.from_settings(settings) as client:
                handle = await client.submit(
                    GenerationRequest(prompt="x", steps=4, scheduler="euler", request_id="o-1")
                )
                answer = await handle.result(180)
            code = await watch.exit_code()
        finally:
            watch.stop()
    assert answer.ok, answer.reason
    assert code == 0, watch.show()
    lines = watch.stdout().splitlines()
    assert lines[0] == "o-1: queued" or lines[0].startswith("o-1: queued,"), lines
    assert "o-1: started, 4 steps" in lines
    steps = [int(line.split()[2]) for line in lines if line.startswith("o-1: step ")]
    assert steps[0] == 1 and steps[-1] == 4 and steps == sorted(set(steps)), lines
    assert all(f"o-1: step {k} of 4 [" in "\n".join(lines) for k in steps)
    assert lines[-1].startswith("o-1: finished")


# cancellation needs the service's side of it (control topic, `cancelled` answers)

# 1000 steps of 4 images: a minute or more on the tiny models, however slow the commands start
LONG = ("--prompt", "a slow one", "--steps", "1000", "--scheduler", "euler", "--num-images", "4")


async def test_ctrl_c_on_submit_cancels_the_request(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    settings = service_settings(kafka, triton, max_steps=1000)
    async with running_service(settings), Client.from_settings(settings) as client:
        handle = client.watch("i-1")
        submit = Command(
            tmp_path,
            settings,
            "submit",
            *LONG,
            "--request-id",
            "i-1",
            "--out",
            str(tmp_path / "i.png"),
        )
        try:
            await submit.wait_for("i-1: step ", 120)
            t0 = time.monotonic()
            os.kill(submit.process.pid, signal.SIGINT)
            code = await submit.exit_code(60)
            took = time.monotonic() - t0
        finally:
            submit.stop()
        answer = await handle.result(30)
    print(f"Ctrl-C to exit with the cancelled answer: {took:.2f} s")
    assert code == 130, submit.show()
    # the cancel, the job leaving at its next step, the answer and the exit; not the 1000 steps
    assert took < 20, took
    assert "cancelling i-1" in submit.stderr()
    assert "request i-1 cancelled" in submit.stderr()
    assert answer.cancelled, answer
    assert not (tmp_path / "i.png").exists()


async def test_cancel_command_cancels_a_running_request(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    settings = service_settings(kafka, triton, max_steps=1000)
    async with running_service(settings), Client.from_settings(settings) as client:
        request = GenerationRequest(
            prompt="x", steps=1000, scheduler="euler", num_images=4, request_id="x-1"
        )
        handle = await client.submit(request)
        async for event in handle:
            if event.event == "step":
                break
        cancel = Command(tmp_path, settings, "cancel", "x-1", "--wait", "--timeout", "60")
        try:
            code = await cancel.exit_code(90)
        finally:
            cancel.stop()
        answer = await handle.result(30)
        handle.close()
    assert code == 0, cancel.show()
    assert "x-1 cancelled" in cancel.stdout()
    assert answer.cancelled
