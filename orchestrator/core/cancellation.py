"""Which requests are cancelled, and which jobs a cancel must stop (pure: time is passed in).

The registry knows the jobs of this instance by request id (waiting for admission, or
running) and remembers cancels: a cancel for a request not seen yet is kept for
`remember_s` seconds (and at most `remember_max` of them, the oldest forgotten first), so
that the request, when it arrives, is answered cancelled without being started. It also
remembers recently finished requests the same way, so that a late cancel for one changes
nothing. Cancelling is idempotent: a second cancel of the same id, or one of a finished id,
changes nothing.

The registry never cancels anything itself: :meth:`CancelRegistry.cancel` marks the job's
entry and hands back its handle (the service's task), and the service cancels it. The mark
tells a cancel command apart from any other cancellation of the same task (shutdown).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Generic, TypeVar

H = TypeVar("H")
V = TypeVar("V")


class Where(enum.StrEnum):
    """Where a cancel found its request (the `where` label of the cancel metric)."""

    #: registered, waiting for admission: it will never start
    WAITING = "waiting"
    #: running: it leaves at its next step boundary
    RUNNING = "running"
    #: the request arrived after its cancel: answered cancelled without starting
    BEFORE_REQUEST = "before_request"
    #: not known here (yet), already finished, or already cancelled: nothing changes now
    UNKNOWN_OR_FINISHED = "unknown_or_finished"


@dataclasses.dataclass
class Tracked(Generic[H]):
    """One job of this instance."""

    request_id: str
    handle: H
    registered_at: float
    running: bool = False
    #: set by a cancel command (before the service cancels the handle); None otherwise
    cancelled_at: float | None = None
    #: when the cancel was issued (the command's issued time), if it says
    issued_at: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None


@dataclasses.dataclass(frozen=True)
class Decision(Generic[H]):
    """What a cancel does: `handle` is the job to cancel now (None: nothing to cancel)."""

    where: Where
    handle: H | None = None
    entry: Tracked[H] | None = None


@dataclasses.dataclass(frozen=True)
class Remembered:
    """A cancel for a request not (yet) seen here."""

    at: float
    issued_at: float | None


class CancelRegistry(Generic[H]):
    def __init__(self, remember_s: float, remember_max: int) -> None:
        if remember_s <= 0:
            raise ValueError("remember_s must be positive")
        if remember_max < 1:
            raise ValueError("remember_max must be at least 1")
        self.remember_s = remember_s
        self.remember_max = remember_max
        self._jobs: dict[str, Tracked[H]] = {}
        #: request id -> the cancel waiting for it, oldest first
        self._cancels: collections.OrderedDict[str, Remembered] = collections.OrderedDict()
        #: request id -> when it finished (or was cancelled), oldest first
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()

    # -- jobs ------------------------------------------------------------------------------

    def register(self, request_id: str, handle: H, now: float) -> Tracked[H]:
        """Track a job, waiting for admission. When a cancel for its id was remembered, the
        entry comes back already cancelled (`entry.cancelled`): the caller answers it
        cancelled without starting it."""
        self._prune(now)
        entry = self._jobs.get(request_id)
        if entry is not None:
            return entry  # the id is handled already (the service runs one job per id)
        entry = Tracked(request_id, handle, now)
        early = self._cancels.pop(request_id, None)
        if early is not None:
            entry.cancelled_at = early.at
            entry.issued_at = early.issued_at
        self._finished.pop(request_id, None)
        self._jobs[request_id] = entry
        return entry

    def started(self, request_id: str) -> bool:
        """The job was admitted and runs; False when it is cancelled (it must not start)."""
        entry = self._jobs.get(request_id)
        if entry is None:
            return True
        if entry.cancelled:
            return False
        entry.running = True
        return True

    def finish(self, request_id: str, now: float) -> None:
        """The job ended (answered, failed or cancelled): later cancels change nothing."""
        self._prune(now)
        self._jobs.pop(request_id, None)
        self._finished[request_id] = now
        self._finished.move_to_end(request_id)
        self._bound(self._finished)

    def job(self, request_id: str) -> Tracked[H] | None:
        return self._jobs.get(request_id)

    # -- cancels ---------------------------------------------------------------------------

    def cancel(self, request_id: str, now: float, issued_at: float | None = None) -> Decision[H]:
        """Apply a cancel command. A job waiting or running is marked cancelled and its handle
        returned (once: a second cancel returns no handle). An id not known here is
        remembered for a request that may still arrive; a finished one is left alone."""
        self._prune(now)
        entry = self._jobs.get(request_id)
        if entry is not None:
            if entry.cancelled:
                return Decision(Where.UNKNOWN_OR_FINISHED, entry=entry)
            entry.cancelled_at = now
            entry.issued_at = issued_at
            where = Where.RUNNING if entry.running else Where.WAITING
            return Decision(where, handle=entry.handle, entry=entry)
        if request_id in self._finished or request_id in self._cancels:
            return Decision(Where.UNKNOWN_OR_FINISHED)
        self._cancels[request_id] = Remembered(now, issued_at)
        self._bound(self._cancels)
        return Decision(Where.UNKNOWN_OR_FINISHED)

    def is_cancelled(self, request_id: str, now: float) -> bool:
        """A cancel is remembered for this id (its request not seen yet), or its job is
        marked cancelled."""
        entry = self._jobs.get(request_id)
        if entry is not None:
            return entry.cancelled
        early = self._cancels.get(request_id)
        return early is not None and now - early.at < self.remember_s

    @property
    def remembered(self) -> int:
        """Cancels remembered for requests not seen yet."""
        return len(self._cancels)

    @property
    def tracked(self) -> int:
        return len(self._jobs)

    # -- bounds ----------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        horizon = now - self.remember_s
        while self._cancels:
            first = next(iter(self._cancels.values()))
            if first.at > horizon:
                break
            self._cancels.popitem(last=False)
        while self._finished:
            if next(iter(self._finished.values())) > horizon:
                break
            self._finished.popitem(last=False)

    def _bound(self, entries: collections.OrderedDict[str, V]) -> None:
        while len(entries) > self.remember_max:
            entries.popitem(last=False)
