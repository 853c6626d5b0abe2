"""Progress events on Kafka: advisory, never waited for by a job.

- :class:`ProgressPublisher`: a bounded queue drained by one task that produces to the progress
  topic with a producer of its own. A job only ever calls :meth:`ProgressPublisher.offer`, which
  never blocks: a full queue, an unknown topic, a broker that is slow or down, a record too large
  drop the event and count it (``orchestrator_progress_dropped{reason}``); acknowledged events
  count in ``orchestrator_progress_events{event}``.
- :class:`ProgressReporter`: the service's side, per job: when it was queued and started, the
  step throttle (:mod:`orchestrator.core.progress`), previews of the latents
  (:mod:`orchestrator.core.preview`), and the headers its events carry (correlation id and the
  job span's ``traceparent``).

Why a producer of its own rather than the service's: aiokafka's sender keeps at most one produce
request in flight per broker, so on a shared producer an answer would queue behind a request full
of progress records (previews are kilobytes each), and a progress topic whose metadata never comes
would hold sends of the same client. Answers must never wait behind progress; a second producer
(``acks=1``: progress is advisory) keeps the two apart, at the cost of one more connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

from orchestrator.adapters.avro import AvroCodec, PreviewRecord, ProgressEventRecord
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    Headers,
    KafkaProducerAdapter,
    KafkaSettings,
    RecordTooLargeError,
)
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.tracing import inject
from orchestrator.core.preview import latents_to_rgb
from orchestrator.core.progress import StepThrottle
from orchestrator.domain import GenerationRequest, JobEvent
from orchestrator.errors import PublishError

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.core.pipeline import Job

log = logging.getLogger("orchestrator.progress")

PREVIEW_MEDIA_TYPE = "image/jpeg"
#: JPEG qualities tried, best first, at each size, before the picture is halved
_QUALITIES = (80, 60, 40, 25)
_MIN_PREVIEW_SIDE = 8
#: how long a producer that could not connect is left alone before the next try
_RECONNECT_S = 5.0


def encode_preview(image: npt.NDArray[np.uint8], max_bytes: int) -> PreviewRecord | None:
    """JPEG-encode an HxWx3 picture under `max_bytes`: lower quality first, then halve the
    size, down to 8 px a side; None when nothing fits."""
    img = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    while True:
        for quality in _QUALITIES:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            data = buf.getvalue()
            if len(data) <= max_bytes:
                return PreviewRecord(
                    index=0,
                    width=img.width,
                    height=img.height,
                    media_type=PREVIEW_MEDIA_TYPE,
                    data=data,
                )
        if min(img.width, img.height) // 2 < _MIN_PREVIEW_SIDE:
            return None
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)


@dataclasses.dataclass(frozen=True)
class _Pending:
    event: ProgressEventRecord
    headers: Headers
    #: RGB pictures (one per image of the request), encoded by the drain task
    images: tuple[npt.NDArray[np.uint8], ...] = ()


class ProgressPublisher:
    """Produces progress events from a bounded queue; never blocks or fails the caller."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        codec: AvroCodec,
        metrics: Metrics,
        *,
        queue_size: int = 1000,
        send_timeout_s: float = 5.0,
        flush_timeout_s: float = 2.0,
        preview_max_bytes: int = 16 * 1024,
        max_record_bytes: int = 1_000_000,
        max_sending: int = 256,
    ) -> None:
        self.topic = topic
        self.codec = codec
        self.metrics = metrics
        self.send_timeout_s = send_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self.preview_max_bytes = preview_max_bytes
        self.producer = KafkaProducerAdapter(
            kafka,
            max_record_bytes=max_record_bytes,
            linger_ms=10,
            request_timeout_ms=max(1000, int(send_timeout_s * 1000)),
            producer_options={"acks": 1},
        )
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._slots = asyncio.Semaphore(max_sending)
        self._sending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._retry_connect_at = 0.0
        #: a send was acknowledged: the topic's metadata is known, sends keep their order
        self._warm = False
        #: counts the tests read: published[event], dropped[reason]
        self.published: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start draining; the producer connects in the background (a broker that is down
        only drops events, it never holds the service's start)."""
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="progress-publisher")

    async def stop(self) -> None:
        """Give queued and in-flight events `flush_timeout_s`, then drop what is left."""
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed(), self.flush_timeout_s)
        task.cancel()
        for sending in list(self._sending):
            sending.cancel()
        await asyncio.gather(task, *self._sending, return_exceptions=True)
        while not self._queue.empty():
            self._drop(self._queue.get_nowait().event, "shutdown")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.producer.stop(), max(self.flush_timeout_s, 1.0))

    async def _flushed(self) -> None:
        await self._queue.join()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    # -- the caller's side -------------------------------------------------------------------

    def offer(
        self,
        event: ProgressEventRecord,
        headers: Headers,
        images: Sequence[npt.NDArray[np.uint8]] = (),
    ) -> bool:
        """Queue one event; False (and counted as dropped) when the queue is full or the
        publisher is not running."""
        if self._task is None:
            self._drop(event, "unavailable")
            return False
        try:
            self._queue.put_nowait(_Pending(event, list(headers), tuple(images)))
        except asyncio.QueueFull:
            self._drop(event, "queue_full")
            return False
        return True

    # -- the drain task ----------------------------------------------------------------------

    def _drop(self, event: ProgressEventRecord, reason: str) -> None:
        self.dropped[reason] += 1
        self.metrics.progress_dropped.labels(reason).inc()
        log.debug("progress event %s of %s dropped: %s", event.event, event.request_id, reason)

    async def _connected(self) -> bool:
        if self.producer.started:
            return True
        if time.monotonic() < self._retry_connect_at:
            return False
        try:
            # bounded by the producer's request timeout (send_timeout_s); not cancelled from
            # here, so a failed start cleans up after itself
            await self.producer.start()
        except Exception as exc:  # PublishError, a timeout, a refused connection
            self._retry_connect_at = time.monotonic() + _RECONNECT_S
            log.warning("progress producer cannot connect (events are dropped): %s", exc)
            return False
        return True

    async def _drain(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                if not await self._connected():
                    self._drop(pending.event, "unavailable")
                    continue
                value = self._encode(pending)
                if value is None:
                    continue
                await self._slots.acquire()
                task = asyncio.create_task(self._send(pending.event, value, pending.headers))
                self._sending.add(task)
                task.add_done_callback(self._sent)
                if not self._warm:
                    # until the topic's metadata is known, a send waits for it before taking
                    # its place in the producer's queue, and concurrent waiters may wake in any
                    # order: one at a time keeps a job's events in order
                    await asyncio.wait([task])
            finally:
                self._queue.task_done()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._slots.release()

    def _encode(self, pending: _Pending) -> bytes | None:
        event = pending.event
        if pending.images:
            previews = []
            for index, image in enumerate(pending.images):
                preview = encode_preview(image, self.preview_max_bytes)
                if preview is None:
                    self.metrics.previews_dropped.inc()
                    continue
                previews.append(dataclasses.replace(preview, index=index))
            event = dataclasses.replace(event, previews=tuple(previews))
        try:
            return self.codec.encode_progress(event)
        except Exception as exc:  # a value the schema refuses: a bug, never the job's failure
            log.error("cannot encode progress event %s: %r", event.event, exc)
            self._drop(event, "encode_error")
            return None

    async def _send(self, event: ProgressEventRecord, value: bytes, headers: Headers) -> None:
        try:
            # the producer gives up on metadata or the ack after send_timeout_s (its request
            # timeout), naming why; this bound is the backstop
            await asyncio.wait_for(
                self.producer.publish(
                    self.topic, value, key=event.request_id.encode(), headers=headers
                ),
                self.send_timeout_s + 1.0,
            )
        except RecordTooLargeError:
            self._drop(event, "too_large")
        except TimeoutError:
            self._drop(event, "timeout")
        except PublishError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else ""
            self._drop(event, "unknown_topic" if "UnknownTopic" in cause else "broker_error")
        except asyncio.CancelledError:
            self._drop(event, "shutdown")
            raise
        except Exception as exc:
            log.warning("progress event %s not published: %r", event.event, exc)
            self._drop(event, "broker_error")
        else:
            self._warm = True
            self.published[event.event] += 1
            self.metrics.progress_events.labels(event.event).inc()


@dataclasses.dataclass
class _JobState:
    headers: Headers
    queued_at: float
    throttle: StepThrottle
    started_at: float | None = None


class ProgressReporter:
    """Turns what happens to a job into progress events (one reporter per service)."""

    #: jobs remembered at most (an entry is forgotten at its terminal event; this bounds what
    #: jobs cut short by a shutdown leave behind)
    MAX_JOBS = 100_000

    def __init__(self, publisher: ProgressPublisher, settings: Settings) -> None:
        self.publisher = publisher
        self.step_events_per_s = settings.progress_step_events_per_s
        self.preview_interval_s = settings.preview_interval_s
        self.preview_max_side = settings.preview_max_side
        self._jobs: collections.OrderedDict[str, _JobState] = collections.OrderedDict()

    def headers(self, correlation: str | None) -> Headers:
        """The correlation id and the current span's ``traceparent``."""
        headers: Headers = [(CORRELATION_ID_HEADER, correlation.encode())] if correlation else []
        inject(headers)
        return headers

    def queued(
        self,
        request: GenerationRequest,
        correlation: str | None,
        queue_position: int | None = None,
    ) -> None:
        """The record is admitted (validated, not a duplicate); call inside the job's span.
        Never raises (as none of the reporter's methods): progress is advisory."""
        try:
            now = time.monotonic()
            self._follow(request, correlation, now)
            self._offer(request.request_id, JobEvent.QUEUED, now, queue_position=queue_position)
        except Exception:
            log.exception("queued event of %s failed", request.request_id)

    def track(self, request: GenerationRequest, correlation: str | None) -> None:
        """Follow a job queued elsewhere (a stage role resuming a hand-off): its later events
        carry its correlation id and this role's trace, and no queued event goes out again."""
        try:
            self._follow(request, correlation, time.monotonic())
        except Exception:
            log.exception("tracking %s failed", request.request_id)

    def _follow(self, request: GenerationRequest, correlation: str | None, now: float) -> None:
        self._jobs[request.request_id] = _JobState(
            headers=self.headers(correlation or request.request_id),
            queued_at=now,
            throttle=StepThrottle(
                self.step_events_per_s, self.preview_interval_s, previews=request.preview
            ),
        )
        while len(self._jobs) > self.MAX_JOBS:
            self._jobs.popitem(last=False)

    def started(self, request: GenerationRequest, steps: int) -> None:
        """The job starts (after admission); its elapsed_ms is the time it waited since
        queued, and later events count from here."""
        try:
            now = time.monotonic()
            self._offer(request.request_id, JobEvent.STARTED, now, steps=steps)
            state = self._jobs.get(request.request_id)
            if state is not None:
                state.started_at = now
        except Exception:
            log.exception("started event of %s failed", request.request_id)

    def on_step(self, job: Job, step: int, steps: int) -> None:
        """The executor's hook: step `step` of `steps` denoising steps is done. Never raises:
        a failure here costs the event, not the job."""
        try:
            self._on_step(job, step, steps)
        except Exception:
            log.exception("progress of %s at step %d failed", job.request.request_id, step)

    def _on_step(self, job: Job, step: int, steps: int) -> None:
        state = self._jobs.get(job.request.request_id)
        if state is None:
            return
        now = time.monotonic()
        decision = state.throttle.decide(now, step, steps)
        if not decision.send:
            return
        images: Sequence[npt.NDArray[np.uint8]] = ()
        if decision.preview and job.latents is not None:
            images = latents_to_rgb(job.latents, self.preview_max_side)
        self._offer(job.request.request_id, JobEvent.STEP, now, step, steps, images=images)

    def event(
        self,
        request: GenerationRequest,
        event: JobEvent,
        *,
        correlation: str | None = None,
        step: int = 0,
        steps: int = 0,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """Any other event (finished, failed, cancelled); a terminal one forgets the job."""
        if not request.request_id:
            return
        if request.request_id not in self._jobs and correlation is not None:
            # never queued (refused before admission): its own headers
            self._offer(
                request.request_id,
                event,
                time.monotonic(),
                step,
                steps,
                reason=reason,
                message=message,
                headers=self.headers(correlation),
            )
            return
        self._offer(
            request.request_id,
            event,
            time.monotonic(),
            step,
            steps,
            reason=reason,
            message=message,
        )
        if event.terminal:
            self._jobs.pop(request.request_id, None)

    def _offer(
        self,
        request_id: str,
        event: JobEvent,
        now: float,
        step: int = 0,
        steps: int = 0,
        *,
        reason: str | None = None,
        message: str | None = None,
        images: Sequence[npt.NDArray[np.uint8]] = (),
        headers: Headers | None = None,
        queue_position: int | None = None,
    ) -> None:
        state = self._jobs.get(request_id)
        elapsed = 0.0
        if state is not None:
            since = state.queued_at if state.started_at is None else state.started_at
            elapsed = (now - since) * 1000.0
            headers = state.headers if headers is None else headers
        record = ProgressEventRecord(
            request_id=request_id,
            event=event.value,
            timestamp_ms=int(time.time() * 1000),
            step=step,
            steps=steps,
            elapsed_ms=elapsed,
            reason=reason,
            message=message[:1000] if message else None,
            queue_position=queue_position,
        )
        self.publisher.offer(record, headers or [], images)
