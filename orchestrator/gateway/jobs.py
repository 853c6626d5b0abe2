"""The state of every gateway job, rebuilt from records (pure: no I/O).

Registry records (JSON, on the gateway's compacted topic) say who created a job and how; progress
events, results and dead letters move it along. Records may arrive in any order across topics
(an answer before the registry record, on a replica catching up): each is applied to the job's
state whenever it comes, and the terminal state, once reached, never goes back.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from orchestrator.adapters.avro import OUTCOME_CANCELLED, GenerationResultRecord, ImageRecord
from orchestrator.adapters.avro import ProgressEventRecord as Progress
from orchestrator.domain import JobEvent

REGISTRY_VERSION = 1
#: every gateway job's id (its request id) starts so; the tail skips other requests' records
JOB_ID_PREFIX = "gw-"

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclasses.dataclass(frozen=True)
class Registration:
    """What the gateway wrote about a job when it took it."""

    job_id: str
    owner: str
    created_ms: int
    body_sha256: str
    idempotency_key: str | None = None
    webhook: str | None = None
    response_format: str = "url"
    preview: bool = False
    replica: str = ""

    def encode(self) -> bytes:
        return json.dumps({"v": REGISTRY_VERSION, **dataclasses.asdict(self)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Registration:
        """Raises ValueError for a record that is not a registration."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("v") != REGISTRY_VERSION:
            raise ValueError("not a version-1 registration")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


@dataclasses.dataclass
class SseEvent:
    """One event of a job's stream: `seq` is its id (1, 2, ... in the job's progress order)."""

    seq: int
    record: Progress


@dataclasses.dataclass
class Job:
    job_id: str
    registration: Registration | None = None
    status: str = QUEUED
    step: int = 0
    steps: int = 0
    queue_position: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    reason: str | None = None
    message: str | None = None
    result: GenerationResultRecord | None = None
    events: list[SseEvent] = dataclasses.field(default_factory=list)
    #: bumped by every change, so waiters can tell
    version: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def images(self) -> tuple[ImageRecord, ...]:
        return () if self.result is None else self.result.images

    def _touch(self) -> None:
        self.version += 1


def progress_data(event: Progress, with_previews: bool) -> dict[str, Any]:
    """The JSON of one progress event in an events stream."""
    data: dict[str, Any] = {
        "event": event.event,
        "timestamp_ms": event.timestamp_ms,
        "step": event.step,
        "steps": event.steps,
        "elapsed_ms": event.elapsed_ms,
    }
    if event.reason is not None:
        data["reason"] = event.reason
    if event.message is not None:
        data["message"] = event.message
    if event.queue_position is not None:
        data["queue_position"] = event.queue_position
    if with_previews and event.previews:
        data["previews"] = [
            {
                "index": p.index,
                "width": p.width,
                "height": p.height,
                "media_type": p.media_type,
                "data_b64": base64.b64encode(p.data).decode("ascii"),
            }
            for p in event.previews
        ]
    return data


class JobBook:
    """Every job this replica has seen, by id, with the idempotency index."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        #: (owner, idempotency key) -> job id
        self.idempotency: dict[tuple[str, str], str] = {}
        self.version = 0

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(job_id)
        return job

    def _changed(self, job: Job) -> None:
        job._touch()
        self.version += 1

    def register(self, reg: Registration) -> Job:
        job = self._job(reg.job_id)
        if job.registration is None:
            job.registration = reg
            if reg.idempotency_key:
                self.idempotency.setdefault((reg.owner, reg.idempotency_key), reg.job_id)
            self._changed(job)
        return job

    def by_idempotency_key(
        self, owner: str, key: str, now_ms: int, ttl_ms: int
    ) -> Registration | None:
        job_id = self.idempotency.get((owner, key))
        if job_id is None:
            return None
        reg = self.jobs[job_id].registration
        if reg is None or now_ms - reg.created_ms > ttl_ms:
            return None
        return reg

    def progress(self, event: Progress) -> Job:
        """Move the job along by a progress event, kept for its events stream. A `finished`
        event read after the job ended is dropped: the service sends it once the result is
        acknowledged, so it often comes after the answer, and it says nothing the outcome does
        not; kept, it would take the id the stream already gave the outcome, and a client
        resuming from the outcome's id would get the outcome again instead of a 204. Other
        events read late (a restarted replica reading the topics in its own order) are kept:
        they are the job's history."""
        job = self._job(event.request_id)
        if job.terminal and event.event == JobEvent.FINISHED:
            return job
        job.events.append(SseEvent(len(job.events) + 1, event))
        if not job.terminal:
            if event.event == JobEvent.QUEUED:
                job.queue_position = event.queue_position
            elif event.event in (JobEvent.STARTED, JobEvent.STEP):
                job.status = RUNNING
                job.queue_position = None
                if job.started_ms is None:
                    job.started_ms = event.timestamp_ms
                job.step = max(job.step, event.step)
                job.steps = event.steps or job.steps
            elif event.event == JobEvent.FAILED:
                # advisory: the dead letter is the answer, but the event says it first
                self._finish(job, FAILED, event.timestamp_ms, event.reason, event.message)
            elif event.event == JobEvent.CANCELLED:
                self._finish(job, CANCELLED, event.timestamp_ms, "cancelled", event.message)
        self._changed(job)
        return job

    def result(self, job_id: str, result: GenerationResultRecord, now_ms: int) -> Job:
        job = self._job(job_id)
        if job.result is None and job.status not in (SUCCEEDED,):
            if result.outcome == OUTCOME_CANCELLED:
                self._finish(job, CANCELLED, now_ms, "cancelled", None)
            else:
                job.result = result
                job.step = job.steps or job.step
                self._finish(job, SUCCEEDED, now_ms, None, None, force=True)
            self._changed(job)
        return job

    def dead_letter(self, job_id: str, failure: Mapping[str, str], now_ms: int) -> Job:
        job = self._job(job_id)
        if job.status != FAILED or job.message is None:
            self._finish(
                job,
                FAILED,
                now_ms,
                failure.get("reason") or "failed",
                failure.get("message") or None,
                force=job.status == FAILED,
            )
            self._changed(job)
        return job

    @staticmethod
    def _finish(
        job: Job,
        status: str,
        at_ms: int,
        reason: str | None,
        message: str | None,
        force: bool = False,
    ) -> None:
        if job.terminal and not force:
            return
        job.status = status
        job.finished_ms = job.finished_ms or at_ms
        job.reason = reason
        job.message = message
        job.queue_position = None
