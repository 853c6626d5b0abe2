"""Cancelling jobs by request id (issue 10): every instance reads every cancel command.

A job runs as an inner task registered under its request id; a cancel command cancels that
task (waiting for admission: it never starts; running: it leaves its batch at the next step
boundary), and `run` returns None so that the caller answers ``outcome=cancelled``. A cancel for
an id not known here is remembered (`cancel_remember_s`) for a request that may still arrive,
which is how a cancel meets a job in whichever stage role it reaches next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from orchestrator.adapters.avro import ControlCommandRecord
from orchestrator.adapters.metrics import Metrics
from orchestrator.answering import ServiceStats
from orchestrator.config import Settings
from orchestrator.core.cancellation import CancelRegistry, Tracked, Where

log = logging.getLogger("orchestrator.service")

T = TypeVar("T")


class Cancelling:
    """The registry of cancellable jobs, and the cancel commands applied to it."""

    def __init__(self, settings: Settings, *, metrics: Metrics, stats: ServiceStats) -> None:
        self.metrics = metrics
        self.stats = stats
        self.registry: CancelRegistry[asyncio.Task[Any]] = CancelRegistry(
            settings.cancel_remember_s, settings.cancel_remember_max
        )

    async def run(self, request_id: str, job: Coroutine[Any, Any, T], span: Any) -> T | None:
        """Run `job` as an inner task registered under `request_id`; None when a cancel command
        stopped it (or came before the request). Any other cancellation (shutdown, rebalance)
        propagates as before."""
        inner = asyncio.create_task(job)
        entry = self.registry.register(request_id, inner, time.time())
        if entry.cancelled:  # its cancel came first: never started
            inner.cancel()
            self.metrics.cancels.labels(Where.BEFORE_REQUEST).inc()
        inner.add_done_callback(lambda _: self._freed(entry))
        try:
            return await inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not entry.cancelled or (current is not None and current.cancelling()):
                raise
        finally:
            self.registry.finish(request_id, time.time())
        self._record(request_id, entry, span)
        return None

    def on_cancel(self, command: ControlCommandRecord) -> None:
        """A cancel command from the control topic (never blocks)."""
        decision = self.registry.cancel(
            command.request_id, time.time(), issued_at=command.issued_ms / 1000.0
        )
        where = decision.where
        if decision.handle is not None and not decision.handle.cancel():
            where = Where.UNKNOWN_OR_FINISHED  # it had just finished: its answer stands
        self.metrics.cancels.labels(where).inc()
        log.info(
            "cancel of %s: %s",
            command.request_id[:256],
            where,
            extra={"request_id": command.request_id[:256]},
        )

    def _freed(self, entry: Tracked[asyncio.Task[Any]]) -> None:
        if entry.cancelled:
            freed = self.stats.cancel_freed_at
            freed[entry.request_id] = time.time()
            while len(freed) > 10_000:
                del freed[next(iter(freed))]

    def _record(self, request_id: str, entry: Tracked[asyncio.Task[Any]], span: Any) -> None:
        freed = self.stats.cancel_freed_at.get(request_id, time.time())
        where = Where.RUNNING if entry.running else Where.WAITING
        if entry.cancelled_at is not None and entry.cancelled_at <= entry.registered_at:
            where = Where.BEFORE_REQUEST  # remembered before the request was registered
        attributes: dict[str, Any] = {"cancel.where": str(where)}
        if entry.issued_at is not None:
            attributes["cancel.issued_ms"] = int(entry.issued_at * 1000)
            attributes["cancel.latency_ms"] = round((freed - entry.issued_at) * 1000.0, 3)
        span.add_event("cancelled", attributes)
        span.set_attribute("request.cancelled", True)
        log.info("cancelled %s", request_id[:256])
