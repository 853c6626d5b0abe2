"""The admission gate: at most `max_active` jobs hold a slot; the others wait in priority order.

``async with gate.slot(request):`` waits for a slot (the policy is ``core/admission.py``) and
releases it however the block exits. A waiter that is cancelled is taken out of the queue and
never starts (a slot handed to it in the same instant is passed on). A waiter whose deadline has
passed, or can no longer be met by the run-time estimate, is woken at once by a timer with
:class:`~orchestrator.errors.DeadlineExceeded`, so it is answered ``deadline_exceeded`` without
waiting to reach the head of the queue.

Preemption (``preempt=True``): while a high waits and no slot is free, a running job of a worse
class is asked to yield (policy: ``core/admission.py``). The job notices at its next step
boundary by awaiting :meth:`AdmissionGate.checkpoint`, which returns at once unless it was asked:
then it releases its slot, waits in the queue again with its original arrival, and returns when
it holds a slot again. A job cancelled while it waits there holds nothing, so nothing is freed
twice; one whose deadline can no longer be met gets ``DeadlineExceeded`` from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from orchestrator.core.admission import (
    AdmissionPolicy,
    AdmissionQueue,
    Running,
    preemption_victims,
    priority_of,
)
from orchestrator.domain import GenerationRequest, Priority
from orchestrator.errors import DeadlineExceeded


@dataclasses.dataclass
class _Waiter:
    request_id: str
    priority: Priority
    future: asyncio.Future[None]
    #: a preempted job waiting to resume (no admission hooks when it gets its slot back)
    resumed: bool = False


@dataclasses.dataclass
class _Job:
    """A job inside its `slot` block."""

    request_id: str
    priority: Priority
    arrival: float
    deadline: float | None
    holds: bool = True
    preemptions: int = 0
    asked: bool = False
    suspended_s: float = 0.0


class AdmissionGate:
    """Slots for active jobs. Hooks (all optional, called on the loop, must not block):
    `on_queue` with the waiting counts by class after every change, `on_admit(priority,
    waited_s)`, `on_refuse(priority)`, and the listeners of :meth:`on_slot_freed`."""

    def __init__(
        self,
        max_active: int,
        policy: AdmissionPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_queue: Callable[[dict[Priority, int]], None] | None = None,
        on_admit: Callable[[Priority, float], None] | None = None,
        on_refuse: Callable[[Priority], None] | None = None,
        preempt: bool = False,
        max_preemptions: int = 2,
    ) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        if max_preemptions < 0:
            raise ValueError("max_preemptions must be >= 0")
        self.max_active = max_active
        self.preempt = preempt
        self.max_preemptions = max_preemptions
        #: times a running job yielded its slot
        self.preemptions = 0
        self.queue: AdmissionQueue[int] = AdmissionQueue(policy)
        self.clock = clock
        self.active = 0
        self._on_queue = on_queue
        self._on_admit = on_admit
        self._on_refuse = on_refuse
        self._freed: list[Callable[[str], None]] = []
        self._waiters: dict[int, _Waiter] = {}
        self._key_of: dict[str, int] = {}
        self._next_key = 0
        self._timer: asyncio.TimerHandle | None = None
        self._jobs: dict[str, _Job] = {}

    # -- what others read --------------------------------------------------------------------

    def waiting(self) -> dict[Priority, int]:
        """Jobs waiting for a slot, by class."""
        return self.queue.lengths()

    def position(self, request_id: str) -> int | None:
        """1 for the waiter admitted next; None when `request_id` is not waiting."""
        key = self._key_of.get(request_id)
        return None if key is None else self.queue.position(key, self.clock())

    def on_slot_freed(self, listener: Callable[[str], None]) -> None:
        """Call `listener(request_id)` each time a slot is released (the job has left)."""
        self._freed.append(listener)

    # -- the slot ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, request: GenerationRequest) -> AsyncIterator[None]:
        priority = priority_of(getattr(request, "priority", "normal"))
        steps = max(1, request.steps)
        arrived = self.clock()
        if self.active < self.max_active and not self.queue:
            if self.queue.refuses(request.deadline, steps, arrived):
                self._refused(priority)
                raise _deadline_error(request.deadline, arrived)
            self.active += 1
            self._admitted(priority, 0.0)
        else:
            await self._wait(request.request_id, priority, steps, arrived, request.deadline)
        job = _Job(request.request_id, priority, arrived, request.deadline)
        self._jobs[request.request_id] = job
        started = self.clock()
        finished = False
        try:
            yield
            finished = True
        finally:
            if self._jobs.get(request.request_id) is job:
                del self._jobs[request.request_id]
            if finished:
                self.queue.observe(self.clock() - started - job.suspended_s, steps)
            if job.holds:
                self._release(request.request_id)

    async def checkpoint(
        self,
        request_id: str,
        steps_left: int = 1,
        suspend: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        """A step boundary of a running job: returns at once unless the job was asked to yield
        and a high still waits; then gives the slot up, waits (inside `suspend()` when given),
        and returns holding a slot again. `steps_left` feeds the deadline estimate meanwhile."""
        job = self._jobs.get(request_id)
        if job is None or not job.asked:
            return
        job.asked = False
        if not self._highs_waiting():
            return  # the high it yielded for was admitted or went away
        job.preemptions += 1
        self.preemptions += 1
        job.holds = False
        self.active -= 1
        self._wake()
        t0 = self.clock()
        try:
            if suspend is None:
                await self._wait(
                    request_id, job.priority, steps_left, job.arrival, job.deadline, True
                )
            else:
                async with suspend():
                    await self._wait(
                        request_id, job.priority, steps_left, job.arrival, job.deadline, True
                    )
            job.holds = True
        finally:
            job.suspended_s += self.clock() - t0

    async def _wait(
        self,
        request_id: str,
        priority: Priority,
        steps: int,
        arrived: float,
        deadline: float | None,
        resumed: bool = False,
    ) -> None:
        key = self._next_key
        self._next_key += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.add(key, priority, arrived, deadline=deadline, steps=steps)
        self._waiters[key] = _Waiter(request_id, priority, future, resumed)
        self._key_of[request_id] = key
        if resumed:
            self._wake()  # the slot it gave up may have found no taker: then it is its own
        else:
            self._changed()
            self._ask_to_yield()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(request_id)  # granted in the same instant: pass it on
            raise
        finally:
            if self.queue.remove(key) is not None:
                self._changed()
            self._waiters.pop(key, None)
            if self._key_of.get(request_id) == key:
                del self._key_of[request_id]

    def _highs_waiting(self) -> list[Priority]:
        return [
            w.priority
            for w in self._waiters.values()
            if w.priority is Priority.HIGH and not w.resumed and not w.future.done()
        ]

    def _ask_to_yield(self) -> None:
        if not self.preempt or self.active < self.max_active:
            return
        waiting = self._highs_waiting()
        running = [
            Running(j.request_id, j.priority, j.arrival, j.preemptions, j.asked)
            for j in self._jobs.values()
            if j.holds
        ]
        for request_id in preemption_victims(waiting, running, self.max_preemptions):
            self._jobs[request_id].asked = True

    def _release(self, request_id: str) -> None:
        self.active -= 1
        self._wake()
        for listener in list(self._freed):
            listener(request_id)

    def _wake(self) -> None:
        """Refuse what can no longer be met, then hand free slots out in order."""
        now = self.clock()
        for entry in self.queue.refusals(now):
            waiter = self._waiters[entry.key]
            if not waiter.future.done():
                self._refused(waiter.priority)
                waiter.future.set_exception(_deadline_error(entry.deadline, now))
        while self.active < self.max_active:
            head = self.queue.pop(now)
            if head is None:
                break
            waiter = self._waiters[head.key]
            if waiter.future.done():  # cancelled meanwhile: its finally cleans up
                continue
            self.active += 1
            if not waiter.resumed:
                self._admitted(waiter.priority, now - head.arrival)
            waiter.future.set_result(None)
        self._changed()
        self._ask_to_yield()

    def _changed(self) -> None:
        if self._on_queue is not None:
            self._on_queue(self.queue.lengths())
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.queue.next_refusal_at()
        if at is None:
            return
        delay = max(0.0, at - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _admitted(self, priority: Priority, waited_s: float) -> None:
        if self._on_admit is not None:
            self._on_admit(priority, max(0.0, waited_s))

    def _refused(self, priority: Priority) -> None:
        if self._on_refuse is not None:
            self._on_refuse(priority)


def _deadline_error(deadline: float | None, now: float) -> DeadlineExceeded:
    if deadline is not None and now >= deadline:
        text = "the request's deadline passed before it was started"
    else:
        text = "the request's deadline cannot be met: it would finish after it (run-time estimate)"
    return DeadlineExceeded(text, stage="admission")
