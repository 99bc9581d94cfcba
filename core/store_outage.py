"""How a write outlasts an object store that is away: tries again with doubling waits
inside a window of time, and says so at most once a minute rather than once per try.

Pure bookkeeping over a clock the caller reads; the pack host's writer uses it to keep a
finished job's adapter until the store is back (workers/host/writer.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetryWindow:
    """Failed tries of one write, from `started_at` (seconds on the caller's clock)."""

    window_s: float  # no try starts later than this after `started_at`
    started_at: float
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    report_every_s: float = 60.0
    failures: int = 0
    _reported_at: float | None = None

    def failed(self, now: float) -> float | None:
        """Counts a failed try; the seconds to wait before the next, or None when the
        window is over. The last wait ends at the window's end, so one try lands there."""
        self.failures += 1
        left = self.started_at + self.window_s - now
        if left <= 0:
            return None
        delay = self.first_delay_s * 2 ** (self.failures - 1)
        return min(delay, self.max_delay_s, left)

    def report_due(self, now: float) -> bool:
        """True on the first failure and then once per `report_every_s`."""
        if self._reported_at is not None and now - self._reported_at < self.report_every_s:
            return False
        self._reported_at = now
        return True

    def elapsed(self, now: float) -> float:
        return now - self.started_at
