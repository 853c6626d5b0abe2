"""Which Triton endpoint gets the next call: pure policy, no I/O.

Least outstanding work first (rows in flight, so a big batch weighs more than a small call), only
among endpoints whose circuit is closed; ties go to the endpoint that has been faster per row
lately, then round-robin, so that lockstep step batching (one call at a time) still spreads its
calls and a slow endpoint gets less work. An endpoint's circuit opens after a number of
consecutive transient failures and closes when a readiness probe succeeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

#: weight of the newest sample in the per-row latency average
EWMA_ALPHA = 0.3


@dataclasses.dataclass
class EndpointState:
    """What the policy knows of one endpoint."""

    address: str
    outstanding_rows: int = 0
    outstanding_calls: int = 0
    consecutive_failures: int = 0
    open: bool = False
    #: moving average of seconds per row (None until a call finished)
    seconds_per_row: float | None = None
    #: rows sent so far (what "a fair share" is measured with)
    rows_sent: int = 0
    calls_sent: int = 0
    failures: int = 0

    @property
    def available(self) -> bool:
        return not self.open

    def started(self, rows: int) -> None:
        self.outstanding_rows += rows
        self.outstanding_calls += 1
        self.rows_sent += rows
        self.calls_sent += 1

    def finished(self, rows: int, seconds: float, ok: bool, failure_threshold: int) -> None:
        self.outstanding_rows -= rows
        self.outstanding_calls -= 1
        if ok:
            self.consecutive_failures = 0
            per_row = seconds / max(rows, 1)
            prev = self.seconds_per_row
            self.seconds_per_row = (
                per_row if prev is None else EWMA_ALPHA * per_row + (1 - EWMA_ALPHA) * prev
            )
        else:
            self.failures += 1
            self.consecutive_failures += 1
            if self.consecutive_failures >= failure_threshold:
                self.open = True

    def recovered(self) -> None:
        self.open = False
        self.consecutive_failures = 0


def choose(endpoints: Sequence[EndpointState], turn: int) -> int | None:
    """Index of the endpoint for the next call, or None when every circuit is open.

    `turn` is a counter the caller advances per call (round-robin among equals)."""
    candidates = [i for i, e in enumerate(endpoints) if e.available]
    if not candidates:
        return None
    known = [e.seconds_per_row for e in endpoints if e.seconds_per_row is not None]
    # an endpoint without samples is taken as fast as the fastest, so it gets tried
    fastest = min(known) if known else 0.0

    def cost(i: int) -> tuple[int, float, int]:
        e = endpoints[i]
        speed = e.seconds_per_row if e.seconds_per_row is not None else fastest
        # slower than 1.5x the fastest counts as slower; within that, speeds are equal
        slow = round(speed / fastest, 1) if fastest > 0 and speed > 1.5 * fastest else 1.0
        return (e.outstanding_rows, slow, (i - turn) % len(endpoints))

    return min(candidates, key=cost)


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` (IPv6 as `[addr]:port`) -> [(host, port)]."""
    out: list[tuple[str, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"Triton endpoint {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("no Triton endpoint given")
    return out
