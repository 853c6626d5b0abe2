"""Step batching across jobs: many jobs' model calls, one Triton call per compatible group.

`StepBatcher` is itself a StageRunner: a job's loop is the same whether it runs alone against
Triton (naive mode) or through the batcher. Jobs register while they run; when every registered
job has a call waiting, the batch goes at once, else after `FlushPolicy.max_wait_s`.

With `CohortPolicy(cohorts=2)` registered jobs are split into two cohorts, each flushed on its
own terms (every member waiting, or the wait): one cohort's jobs do their scheduler steps on
the event loop while the other cohort's call runs in Triton, so neither side idles for the
other (docs/benchmarks.md, "Keeping the UNet busy").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy.typing as npt
from opentelemetry import context as otel_context
from opentelemetry import trace

from orchestrator.core.batching import Batch, CohortPolicy, FlushPolicy, merge, pack, split
from orchestrator.domain import StageCall
from orchestrator.errors import OrchestratorError
from orchestrator.executor import StageRunner

Outputs = dict[str, npt.NDArray[Any]]


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """What one executed call carried, for metrics and traces."""

    model: str
    rows: int
    members: int
    duration_s: float
    ok: bool
    tags: tuple[object, ...] = ()


@dataclasses.dataclass
class _Waiting:
    call: StageCall
    future: asyncio.Future[Outputs]
    since: float
    tag: object
    #: the requesting job's current span: the batch span links to it, and it to the batch
    span: trace.Span


#: (batcher, cohort) of the job whose task runs: set by `StepBatcher.job` for its block
_COHORT: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "orchestrator_batch_cohort", default=None
)


@dataclasses.dataclass
class _Cohort:
    """Jobs that flush together, and their calls waiting."""

    waiting: list[_Waiting] = dataclasses.field(default_factory=list)
    active: int = 0
    timer: asyncio.TimerHandle | None = None


class StepBatcher:
    def __init__(
        self,
        runner: StageRunner,
        max_rows: Mapping[str, int],
        policy: FlushPolicy | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
        tracer: trace.Tracer | None = None,
        cohorts: CohortPolicy | None = None,
    ) -> None:
        self.tracer = tracer or trace.NoOpTracer()
        self.runner = runner
        self.max_rows = dict(max_rows)
        self.policy = policy or FlushPolicy()
        self.cohort_policy = cohorts or CohortPolicy()
        self.on_batch = on_batch
        self._cohorts = [_Cohort() for _ in range(self.cohort_policy.cohorts)]
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return sum(c.active for c in self._cohorts)

    @property
    def cohort_sizes(self) -> tuple[int, ...]:
        """Active jobs per cohort."""
        return tuple(c.active for c in self._cohorts)

    @contextlib.asynccontextmanager
    async def job(self) -> AsyncIterator[None]:
        """Count a job as active (expected to submit) for as long as the block runs.

        The job joins a cohort (the smallest); its calls made from within the block, in this
        task or tasks it starts, wait and flush with that cohort's."""
        index = self.cohort_policy.assign(self.cohort_sizes)
        cohort = self._cohorts[index]
        cohort.active += 1
        token = _COHORT.set((id(self), index))
        try:
            yield
        finally:
            _COHORT.reset(token)
            cohort.active -= 1
            self._maybe_flush(cohort)

    @contextlib.asynccontextmanager
    async def suspended(self) -> AsyncIterator[None]:
        """Within a `job()` block: stop counting the calling job as active while this block runs
        (it waits for something else, e.g. a slot it yielded), so its cohort flushes without it;
        it counts again on exit. Outside a `job()` block it does nothing."""
        mark = _COHORT.get()
        if mark is None or mark[0] != id(self):
            yield
            return
        cohort = self._cohorts[mark[1]]
        cohort.active -= 1
        self._maybe_flush(cohort)  # the others may all be waiting for this one
        try:
            yield
        finally:
            cohort.active += 1

    def _cohort_of_caller(self) -> _Cohort:
        mark = _COHORT.get()
        if mark is not None and mark[0] == id(self):
            return self._cohorts[mark[1]]
        # a call from outside `job()` (not counted as active): it rides with the first cohort
        return self._cohorts[0]

    async def infer(self, call: StageCall, tag: object = None) -> Outputs:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outputs] = loop.create_future()
        cohort = self._cohort_of_caller()
        cohort.waiting.append(_Waiting(call, fut, time.monotonic(), tag, trace.get_current_span()))
        self._maybe_flush(cohort)
        return await fut

    def _maybe_flush(self, cohort: _Cohort, on_timer: bool = False) -> None:
        """Flush when every active job of the cohort waits; a flush for age only happens from
        the timer.

        The age check is left to the timer on purpose: jobs woken by the same batch resume one
        after another in one event-loop pass, each spending CPU time (scheduler step, next
        plan) before it submits. Judging the oldest call's age while they do would cut the
        cohort into small batches although every member was about to submit; the timer runs
        only after the callbacks already scheduled, so it sees them all.
        """
        # a caller cancelled while it waited (its job cancelled) is no longer waiting: left
        # in, it would count as a member that submitted and flush the others early
        cohort.waiting = [w for w in cohort.waiting if not w.future.done()]
        if not cohort.waiting:
            if cohort.timer is not None:
                cohort.timer.cancel()
                cohort.timer = None
            return
        oldest = time.monotonic() - cohort.waiting[0].since
        age = oldest if on_timer else 0.0
        if self.policy.should_flush(len(cohort.waiting), cohort.active, age):
            self._flush(cohort)
        elif cohort.timer is None:
            delay = max(0.0, self.policy.max_wait_s - oldest)
            cohort.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, cohort)

    def _on_timer(self, cohort: _Cohort) -> None:
        cohort.timer = None
        self._maybe_flush(cohort, on_timer=True)

    def _flush(self, cohort: _Cohort) -> None:
        if cohort.timer is not None:
            cohort.timer.cancel()
            cohort.timer = None
        waiting, cohort.waiting = cohort.waiting, []
        # a caller that gave up (cancelled) no longer needs its call made
        waiting = [w for w in waiting if not w.future.done()]
        calls = [w.call for w in waiting]
        for members in pack(calls, self.max_rows):
            batch = merge(calls, members)
            task = asyncio.get_running_loop().create_task(
                self._run(batch, [waiting[i] for i in members])
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Batch, members: list[_Waiting]) -> None:
        rows = int(next(iter(batch.call.inputs.values())).shape[0])
        links = [
            trace.Link(w.span.get_span_context())
            for w in members
            if w.span.get_span_context().is_valid
        ]
        # a root span of its own (not a child of whichever job happened to flush), linked to
        # every participating request's step span, and they to it
        with self.tracer.start_as_current_span(
            f"batch {batch.call.model}",
            context=otel_context.Context(),
            kind=trace.SpanKind.CLIENT,
            links=links,
            attributes={
                "triton.model": batch.call.model,
                "batch.rows": rows,
                "batch.requests": len(members),
            },
        ) as span:
            ctx = span.get_span_context()
            if ctx.is_valid:
                for w in members:
                    if w.span.is_recording():
                        w.span.add_link(ctx, {"batch.requests": len(members)})
            await self._execute(batch, members)

    async def _execute(self, batch: Batch, members: list[_Waiting]) -> None:
        start = time.monotonic()
        try:
            outputs = await self.runner.infer(batch.call)
        except Exception as exc:
            trace.get_current_span().record_exception(exc)
            trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            self._record(batch, members, start, ok=False)
            retriable = isinstance(exc, OrchestratorError) and exc.retriable
            if len(members) == 1 or retriable:
                for w in members:
                    if not w.future.done():
                        w.future.set_exception(exc)
                return
            # a non-retriable failure of a merged call: find the culprit by running each alone,
            # so that one job's bad input does not fail the others
            await asyncio.gather(*(self._run_alone(w) for w in members))
            return
        self._record(batch, members, start, ok=True)
        for w, out in zip(members, split(batch, outputs), strict=True):
            if not w.future.done():
                w.future.set_result(out)

    async def _run_alone(self, w: _Waiting) -> None:
        start = time.monotonic()
        batch = merge([w.call], [0])
        try:
            out = await self.runner.infer(w.call)
        except Exception as exc:
            self._record(batch, [w], start, ok=False)
            if not w.future.done():
                w.future.set_exception(exc)
            return
        self._record(batch, [w], start, ok=True)
        if not w.future.done():
            w.future.set_result(out)

    def _record(self, batch: Batch, members: list[_Waiting], start: float, ok: bool) -> None:
        if self.on_batch is None:
            return
        n_rows = int(next(iter(batch.call.inputs.values())).shape[0])
        self.on_batch(
            BatchRecord(
                model=batch.call.model,
                rows=n_rows,
                members=len(members),
                duration_s=time.monotonic() - start,
                ok=ok,
                tags=tuple(w.tag for w in members),
            )
        )
