"""The gateway's pure parts: job state from records, API keys, token bucket, webhook signature."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from orchestrator.adapters.avro import (
    OUTCOME_CANCELLED,
    GenerationResultRecord,
    ImageRecord,
    PreviewRecord,
    ProgressEventRecord,
)
from orchestrator.gateway import webhook
from orchestrator.gateway.auth import KeyStore, TokenBucket, retry_after_header
from orchestrator.gateway.jobs import JobBook, Registration, progress_data


def _reg(
    job_id: str = "j1", owner: str = "alice", created_ms: int = 1000, **kw: object
) -> Registration:
    return Registration(job_id=job_id, owner=owner, created_ms=created_ms, body_sha256="h", **kw)  # type: ignore[arg-type]


def _ev(event: str, step: int = 0, steps: int = 0, **kw: object) -> ProgressEventRecord:
    return ProgressEventRecord("j1", event, 2000 + step, step=step, steps=steps, **kw)  # type: ignore[arg-type]


def test_registration_round_trip_and_refuses_other_records() -> None:
    reg = _reg(idempotency_key="k", webhook="http://x/")
    assert Registration.decode(reg.encode()) == reg
    with pytest.raises(ValueError):
        Registration.decode(json.dumps({"v": 99, "job_id": "x"}).encode())


def test_job_moves_queued_running_succeeded_and_stays_there() -> None:
    book = JobBook()
    book.register(_reg())
    job = book.progress(_ev("queued", queue_position=3))
    assert (job.status, job.queue_position) == ("queued", 3)
    book.progress(_ev("started", steps=4))
    job = book.progress(_ev("step", step=2, steps=4))
    assert (job.status, job.step, job.steps, job.queue_position) == ("running", 2, 4, None)
    result = GenerationResultRecord("j1", (ImageRecord(0, 8, 8, png=b"png"),), seed=5)
    job = book.result("j1", result, 3000)
    assert job.status == "succeeded" and job.images[0].png == b"png" and job.step == 4
    # a late cancelled event or a duplicate answer changes nothing
    book.progress(_ev("cancelled"))
    book.dead_letter("j1", {"reason": "x"}, 4000)
    assert job.status == "succeeded" and job.finished_ms == 3000
    assert [e.seq for e in job.events] == [1, 2, 3, 4]


def test_finished_event_after_the_answer_leaves_the_stream_as_it_was() -> None:
    """The service sends `finished` after its result is acknowledged, so a gateway's tails often
    read the answer first. The stream gave the outcome id len(events) + 1 then; a `finished`
    appended afterwards would take that id, and a client resuming from the outcome's id would
    get the outcome again, not a 204 (seen as a flaky integration test)."""
    book = JobBook()
    book.register(_reg())
    book.progress(_ev("started", steps=2))
    book.progress(_ev("step", step=1, steps=2))
    result = GenerationResultRecord("j1", (ImageRecord(0, 8, 8, png=b"png"),), seed=5)
    job = book.result("j1", result, 3000)
    outcome_id = len(job.events) + 1
    version = job.version
    job = book.progress(_ev("finished", step=2, steps=2))
    assert len(job.events) + 1 == outcome_id == 3
    assert job.version == version  # no waiter woken for nothing
    # read the other way round, `finished` is a progress event like any other
    other = JobBook()
    other.register(_reg())
    other.progress(_ev("started", steps=2))
    other.progress(_ev("finished", step=2, steps=2))
    job = other.result("j1", result, 3000)
    assert [e.record.event for e in job.events] == ["started", "finished"]


def test_answer_before_registration_and_failure_reason() -> None:
    book = JobBook()
    book.dead_letter("j2", {"reason": "deadline_exceeded", "message": "late"}, 10)
    job = book.get("j2")
    assert job is not None and job.registration is None and job.status == "failed"
    book.register(_reg("j2"))
    assert job.registration is not None and job.reason == "deadline_exceeded"
    assert job.message == "late"


def test_failed_event_then_dead_letter_keeps_the_dead_letter_message() -> None:
    book = JobBook()
    book.progress(_ev("failed", reason="deadline_exceeded"))
    job = book.dead_letter("j1", {"reason": "deadline_exceeded", "message": "too late"}, 9)
    assert (job.status, job.reason, job.message) == ("failed", "deadline_exceeded", "too late")


def test_cancelled_answer() -> None:
    book = JobBook()
    result = GenerationResultRecord("j1", (), seed=0, outcome=OUTCOME_CANCELLED)
    job = book.result("j1", result, 5)
    assert job.status == "cancelled" and job.result is None and job.terminal


def test_idempotency_index_honours_owner_and_ttl() -> None:
    book = JobBook()
    book.register(_reg("a", owner="alice", created_ms=1000, idempotency_key="k"))
    assert book.by_idempotency_key("alice", "k", 2000, 5000) is not None
    assert book.by_idempotency_key("bob", "k", 2000, 5000) is None
    assert book.by_idempotency_key("alice", "k", 7000, 5000) is None


def test_progress_data_previews_only_when_asked() -> None:
    ev = _ev("step", 1, 2, previews=(PreviewRecord(0, 4, 4, "image/png", b"\x89PNG"),))
    assert "previews" not in progress_data(ev, False)
    assert progress_data(ev, True)["previews"][0]["data_b64"] == "iVBORw=="


def test_keystore_hashed_routes_and_malformed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "id": "a",
                        "sha256": hashlib.sha256(b"secret-a").hexdigest(),
                        "routes": ["jobs"],
                        "rate_per_s": 2,
                    },
                    {"id": "b", "sha256": hashlib.sha256(b"secret-b").hexdigest()},
                ]
            }
        )
    )
    store = KeyStore.load(
        path, rate_per_s=5, burst=3, max_concurrent=2, extra_plain_keys={"dev": "d"}
    )
    a = store.authenticate("secret-a")
    assert a is not None and a.key_id == "a" and a.allows("jobs") and not a.allows("images")
    assert a.rate_per_s == 2 and a.burst == 3
    b = store.authenticate("secret-b")
    assert b is not None and b.allows("images")
    dev = store.authenticate("d")
    assert dev is not None and dev.key_id == "dev"
    assert store.authenticate("nope") is None
    assert store.authenticate("") is None
    path.write_text(json.dumps({"keys": [{"id": "x", "sha256": "abcd"}]}))
    with pytest.raises(ValueError, match=r"keys\[0\]"):
        KeyStore.load(path, rate_per_s=1, burst=1, max_concurrent=1)


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.5)
    assert retry_after_header(wait) == "1"
    assert bucket.take(0.5) == 0.0


def test_webhook_signature() -> None:
    header = webhook.sign(b"s3cret", b'{"a":1}', 1000)
    assert webhook.verify(b"s3cret", b'{"a":1}', header, now=1010)
    assert not webhook.verify(b"other", b'{"a":1}', header, now=1010)
    assert not webhook.verify(b"s3cret", b'{"a":2}', header, now=1010)
    assert not webhook.verify(b"s3cret", b'{"a":1}', header, now=5000)  # stale
    assert not webhook.verify(b"s3cret", b"", "garbage", now=1000)


def test_webhook_verify_refuses_forged_headers_without_raising() -> None:
    # a receiver verifies whatever header comes: a mismatch, never a TypeError/OverflowError
    good = webhook.sign(b"s3cret", b"{}", 1000)
    assert not webhook.verify(b"s3cret", b"{}", good[:-1] + "é", now=1000)
    assert not webhook.verify(b"s3cret", b"{}", "t=" + "9" * 400 + ",v1=00", now=1000)
    assert not webhook.verify(b"s3cret", b"{}", "t=-1000,v1=00", now=1000)
    assert not webhook.verify(b"s3cret", b"{}", "t=١٠٠٠,v1=00", now=1000)


def test_size_must_be_a_multiple_of_the_models_unit() -> None:
    # refused at the door (422 naming size), not accepted and dead-lettered by the service
    from orchestrator.config import load_settings
    from orchestrator.errors import ValidationError
    from orchestrator.gateway.app import GenerationBody, _to_request

    settings = load_settings(None)
    ok = _to_request(GenerationBody(prompt="a", size="512x576"), "j1", settings, 64)
    assert (ok.width, ok.height) == (512, 576)
    for size, unit in (("63x64", 8), ("64x63", 8), ("520x512", 64)):
        with pytest.raises(ValidationError) as refused:
            _to_request(GenerationBody(prompt="a", size=size), "j1", settings, unit)
        assert refused.value.field == "size" and str(unit) in str(refused.value)
    assert _to_request(GenerationBody(prompt="a", size="520x512"), "j1", settings, 8).width == 520
