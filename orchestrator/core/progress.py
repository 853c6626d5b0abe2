"""Which denoising steps of a job get a progress event, and which of those carry a preview.

Pure: the caller passes the clock. One :class:`StepThrottle` per job.

- Step events: the first and the last step are always sent; any other step is sent only when at
  least ``1 / step_events_per_s`` seconds passed since the job's previous step event. So a 50-step
  job on a fast GPU sends a handful of records, not 50 in a second: apart from the last step
  (always sent), step events are spaced by the interval, which keeps any one-second window at
  ``step_events_per_s`` events, plus at most the last one.
- Previews (only for requests that asked): attached to a step event that is sent anyway, when at
  least ``preview_interval_s`` passed since the job's previous preview (the first sent step event
  carries the first one).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepDecision:
    """What to do about one finished denoising step."""

    send: bool
    preview: bool = False


_SKIP = StepDecision(send=False)
#: clock readings this close count as equal (float sums of step times are not exact)
_EPS = 1e-6


@dataclasses.dataclass
class StepThrottle:
    """Per-job throttle of step events and previews (see the module docstring)."""

    step_events_per_s: float
    preview_interval_s: float
    previews: bool = False
    _last_event: float | None = dataclasses.field(default=None, init=False)
    _last_preview: float | None = dataclasses.field(default=None, init=False)
    sent: int = dataclasses.field(default=0, init=False)
    skipped: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.step_events_per_s > 0:
            raise ValueError("step_events_per_s must be positive")
        if not self.preview_interval_s > 0:
            raise ValueError("preview_interval_s must be positive")

    @property
    def interval_s(self) -> float:
        """The least time between two step events of the job (the last step excepted)."""
        return 1.0 / self.step_events_per_s

    def decide(self, now: float, step: int, steps: int) -> StepDecision:
        """Step `step` of `steps` (1-based) finished at monotonic time `now`."""
        first = self._last_event is None
        last = step >= steps
        if not (first or last or now - (self._last_event or 0.0) >= self.interval_s - _EPS):
            self.skipped += 1
            return _SKIP
        self._last_event = now
        self.sent += 1
        preview = self.previews and (
            self._last_preview is None or now - self._last_preview >= self.preview_interval_s - _EPS
        )
        if preview:
            self._last_preview = now
        return StepDecision(send=True, preview=preview)
