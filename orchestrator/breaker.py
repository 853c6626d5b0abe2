"""A circuit breaker on Triton.

Consecutive transient failures open it; while open, jobs wait (within their deadline) instead of
burning their retry budget, the service stops pulling new requests, and a probe polls Triton's
readiness. The first successful probe or call closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from orchestrator.errors import DeadlineExceeded

log = logging.getLogger("orchestrator.breaker")


class CircuitBreaker:
    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        failure_threshold: int = 3,
        probe_interval_s: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.probe = probe
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self.on_change = on_change
        self._failures = 0
        self._closed = asyncio.Event()
        self._closed.set()
        self._opened_at = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self.openings = 0

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    def success(self) -> None:
        self._failures = 0
        if self.is_open:
            self._close()

    def failure(self) -> None:
        self._failures += 1
        if not self.is_open and self._failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._closed.clear()
        self._opened_at = time.monotonic()
        self.openings += 1
        log.warning("Triton looks down: circuit open, probing readiness")
        if self.on_change is not None:
            self.on_change(True)
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    def _close(self) -> None:
        self._closed.set()
        self._failures = 0
        log.warning(
            "Triton is back after %.1f s: circuit closed", time.monotonic() - self._opened_at
        )
        if self.on_change is not None:
            self.on_change(False)

    async def _probe_loop(self) -> None:
        while self.is_open:
            await asyncio.sleep(self.probe_interval_s)
            try:
                ok = await self.probe()
            except Exception:
                ok = False
            if ok and self.is_open:
                self._close()

    async def wait_closed(self, deadline: float | None) -> None:
        """Return when the circuit is closed; raise DeadlineExceeded if the request's own deadline
        passes first. A request without a deadline waits for as long as the outage lasts: it is
        never dead-lettered merely because Triton was down."""
        if not self.is_open:
            return
        if deadline is None:
            await self._closed.wait()
            return
        try:
            await asyncio.wait_for(self._closed.wait(), max(0.0, deadline - time.time()))
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed while Triton was down") from None

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
