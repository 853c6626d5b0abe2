"""The admission gate: at most `max_active` jobs hold a slot; the others wait in priority order.

``async with gate.slot(request):`` waits for a slot (the policy is ``core/admission.py``) and
releases it however the block exits. A waiter that is cancelled is taken out of the queue and
never starts (a slot handed to it in the same instant is passed on). A waiter whose deadline has
passed, or can no longer be met by the run-time estimate, is woken at once by a timer with
:class:`~orchestrator.errors.DeadlineExceeded`, so it is answered ``deadline_exceeded`` without
waiting to reach the head of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

from orchestrator.core.admission import AdmissionPolicy, AdmissionQueue, priority_of
from orchestrator.domain import GenerationRequest, Priority
from orchestrator.errors import DeadlineExceeded


@dataclasses.dataclass
class _Waiter:
    request_id: str
    priority: Priority
    future: asyncio.Future[None]


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
    ) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        self.max_active = max_active
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
            await self._wait(request, priority, steps, arrived)
        started = self.clock()
        finished = False
        try:
            yield
            finished = True
        finally:
            if finished:
                self.queue.observe(self.clock() - started, steps)
            self._release(request.request_id)

    async def _wait(
        self, request: GenerationRequest, priority: Priority, steps: int, arrived: float
    ) -> None:
        key = self._next_key
        self._next_key += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.add(key, priority, arrived, deadline=request.deadline, steps=steps)
        self._waiters[key] = _Waiter(request.request_id, priority, future)
        self._key_of[request.request_id] = key
        self._changed()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(request.request_id)  # granted in the same instant: pass it on
            raise
        finally:
            if self.queue.remove(key) is not None:
                self._changed()
            self._waiters.pop(key, None)
            if self._key_of.get(request.request_id) == key:
                del self._key_of[request.request_id]

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
            self._admitted(waiter.priority, now - head.arrival)
            waiter.future.set_result(None)
        self._changed()

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
