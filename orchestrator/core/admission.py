"""Admission policy: which fetched-but-not-started job starts next, and which must be refused.

Pure: no clock, no asyncio. Time (seconds since the epoch, the clock request deadlines use) is
passed in. The runtime gate (``orchestrator/admission.py``) holds one :class:`AdmissionQueue`.

Order, best first:

1. **effective rank**: the class rank (high 0, normal 1, low 2) minus one for every ``aging_s``
   the entry has waited. It keeps falling below 0, so an entry that waited long enough overtakes
   any fresh one whatever its class or deadline. Bound (no starvation): an entry of rank ``r``
   is admitted before every entry of rank ``q`` that arrived ``(r - q + 1) * aging_s`` or more
   after it; so a low entry is admitted before any high entry that arrived ``3 * aging_s`` after
   it, and under a never-ending stream of highs it waits at most for the entries that arrived
   before it plus those of the next ``3 * aging_s``.
2. **deadline**: earliest first; none last.
3. **arrival**: first come, first served.

Refusal (documented rule): an entry is refused when its deadline has passed, or when even if it
started now it would not finish before its deadline: ``now + expected_run_s(steps) > deadline``,
where ``expected_run_s(steps)`` is ``steps`` times an exponentially weighted moving average of
the seconds per denoising step of recent finished jobs (measured slot to slot, so it includes the
batching with the other active jobs). Until a job has finished there is no estimate and only a
passed deadline refuses. The rule never refuses a job that could still make it by the estimate;
it does not guess how long the entry will still wait, so a waiting entry is refused the moment
its ``refusal_at = deadline - expected_run_s(steps)`` passes (the gate sets a timer on the
earliest one).

Preemption (:func:`preemption_victims`): while a request of base class high waits and no slot
is free, one running job of a worse base class per such waiter is asked to yield at its next
denoising step boundary; it gives its slot up, waits again with its original arrival (so its
aging goes on) and resumes from the same step. Only the base class counts on both sides (an
aged low never preempts, and an aged low can still be preempted), and a job yields at most
``max_preemptions`` times, so every job still completes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from orchestrator.domain import Priority

K = TypeVar("K", bound=Hashable)


def priority_of(value: object) -> Priority:
    """The request's priority class; anything unknown (or missing) is normal."""
    try:
        return Priority(str(value))
    except ValueError:
        return Priority.NORMAL


@dataclasses.dataclass(frozen=True)
class AdmissionPolicy:
    """How the queue orders and refuses."""

    #: seconds of waiting that promote an entry by one class
    aging_s: float = 30.0
    #: weight of the newest job in the seconds-per-step average (0 < alpha <= 1)
    ewma_alpha: float = 0.2

    def __post_init__(self) -> None:
        if not self.aging_s > 0:
            raise ValueError("aging_s must be > 0")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[K]):
    """One job fetched, validated and waiting for a slot."""

    key: K
    priority: Priority
    arrival: float
    seq: int
    deadline: float | None
    steps: int


class AdmissionQueue(Generic[K]):
    """The waiting jobs and the run-time estimate. Not thread-safe; one event loop owns it."""

    def __init__(self, policy: AdmissionPolicy | None = None) -> None:
        self.policy = policy or AdmissionPolicy()
        self._entries: dict[K, Entry[K]] = {}
        #: the entries that have a deadline (refusals look at these only), counts by class
        self._timed: dict[K, Entry[K]] = {}
        self._counts = dict.fromkeys(Priority, 0)
        self._seq = 0
        self._s_per_step: float | None = None

    # -- contents ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(
        self,
        key: K,
        priority: Priority,
        now: float,
        *,
        deadline: float | None = None,
        steps: int = 1,
    ) -> Entry[K]:
        if key in self._entries:
            raise KeyError(f"{key!r} is already waiting")
        self._seq += 1
        entry = Entry(key, priority, now, self._seq, deadline, max(1, steps))
        self._entries[key] = entry
        if deadline is not None:
            self._timed[key] = entry
        self._counts[priority] += 1
        return entry

    def remove(self, key: K) -> Entry[K] | None:
        """Take an entry out (cancelled, refused); None when it was not waiting."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._timed.pop(key, None)
            self._counts[entry.priority] -= 1
        return entry

    def lengths(self) -> dict[Priority, int]:
        """Entries waiting, by class (every class present, zeros included)."""
        return dict(self._counts)

    # -- order -------------------------------------------------------------------------------

    def effective_rank(self, entry: Entry[K], now: float) -> int:
        waited = max(0.0, now - entry.arrival)
        return entry.priority.rank - math.floor(waited / self.policy.aging_s)

    def _sort_key(self, entry: Entry[K], now: float) -> tuple[int, float, float, int]:
        deadline = entry.deadline if entry.deadline is not None else math.inf
        return (self.effective_rank(entry, now), deadline, entry.arrival, entry.seq)

    def order(self, now: float) -> list[K]:
        """Waiting keys, the next to admit first."""
        ranked = sorted(self._entries.values(), key=lambda e: self._sort_key(e, now))
        return [e.key for e in ranked]

    def peek(self, now: float) -> K | None:
        if not self._entries:
            return None
        return min(self._entries.values(), key=lambda e: self._sort_key(e, now)).key

    def pop(self, now: float) -> Entry[K] | None:
        """Take the next entry to admit (call :meth:`refusals` first)."""
        key = self.peek(now)
        return None if key is None else self.remove(key)

    def position(self, key: K, now: float) -> int | None:
        """1 for the entry admitted next; None when `key` is not waiting."""
        if key not in self._entries:
            return None
        mine = self._sort_key(self._entries[key], now)
        return 1 + sum(1 for e in self._entries.values() if self._sort_key(e, now) < mine)

    # -- deadlines ---------------------------------------------------------------------------

    def expected_run_s(self, steps: int) -> float:
        """Seconds a job of `steps` steps is expected to run once started (0 with no estimate)."""
        return 0.0 if self._s_per_step is None else self._s_per_step * max(1, steps)

    def observe(self, duration_s: float, steps: int) -> None:
        """A job of `steps` steps held its slot `duration_s` seconds and finished."""
        if duration_s < 0 or steps < 1:
            return
        sample = duration_s / steps
        if self._s_per_step is None:
            self._s_per_step = sample
        else:
            a = self.policy.ewma_alpha
            self._s_per_step = a * sample + (1 - a) * self._s_per_step

    def refusal_at(self, deadline: float | None, steps: int) -> float | None:
        """When a job with this deadline can no longer be met; None without a deadline."""
        return None if deadline is None else deadline - self.expected_run_s(steps)

    def refuses(self, deadline: float | None, steps: int, now: float) -> bool:
        """Whether a job starting at `now` cannot meet `deadline` (passed, or by the estimate)."""
        at = self.refusal_at(deadline, steps)
        return at is not None and now >= at

    def refusals(self, now: float) -> list[Entry[K]]:
        """Take out and return the entries that must be refused now."""
        refused = [e for e in self._timed.values() if self.refuses(e.deadline, e.steps, now)]
        for entry in refused:
            self.remove(entry.key)
        return refused

    def next_refusal_at(self) -> float | None:
        """The earliest time some waiting entry will have to be refused (for a timer)."""
        times = [
            at
            for at in (self.refusal_at(e.deadline, e.steps) for e in self._timed.values())
            if at is not None
        ]
        return min(times, default=None)

    def entries(self) -> Iterable[Entry[K]]:
        return list(self._entries.values())


@dataclasses.dataclass(frozen=True)
class Running(Generic[K]):
    """One job holding a slot, as preemption sees it."""

    key: K
    priority: Priority
    arrival: float
    #: times it has yielded already
    preemptions: int = 0
    #: already asked to yield (and has not yet)
    asked: bool = False


def preemption_victims(
    waiting: Iterable[Priority],
    running: Iterable[Running[K]],
    max_preemptions: int,
) -> list[K]:
    """The running jobs to ask to yield now, given the base classes of the waiters.

    One victim per waiting high that no earlier request already covers; a victim has a worse
    base class than high and has yielded fewer than `max_preemptions` times. The worst class
    goes first, then the latest arrival (it waited least, so yielding costs it least aging)."""
    highs = sum(1 for p in waiting if p is Priority.HIGH)
    jobs = list(running)
    needed = highs - sum(1 for r in jobs if r.asked)
    if needed <= 0:
        return []
    candidates = [
        r
        for r in jobs
        if not r.asked and r.priority.rank > Priority.HIGH.rank and r.preemptions < max_preemptions
    ]
    candidates.sort(key=lambda r: (-r.priority.rank, -r.arrival))
    return [r.key for r in candidates[:needed]]
