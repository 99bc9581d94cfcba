"""A running job's `estimated_finish` (OpenAI's field, unix seconds): its steps left times
its measured time per step, updated with each poll of its host.

The time per step is measured between the job's own metrics events (the host's wall clock
at each step's end), over a window of recent steps, so whatever else its steps wait for
(pack-mates, evaluation, checkpoint copies) counts; with a single step seen so far, that
step's own `step_seconds`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

# Recent steps the rate is measured over: long enough to smooth one slow step out, short
# enough to follow a pack that gains or loses members.
WINDOW_STEPS = 20

Point = tuple[float, int]  # (host time at the step's end, step)


def estimate_finish(window: Sequence[Point], total_steps: int, step_seconds: float) -> int:
    """Unix seconds at which the last step should end. `window`: the job's recent
    (time, step) points, oldest first, the newest being where it is now."""
    now, step = window[-1]
    first_time, first_step = window[0]
    per_step = (now - first_time) / (step - first_step) if step > first_step else step_seconds
    return round(now + max(0, total_steps - step) * per_step)


class FinishEstimates:
    """Each running job's recent steps, kept by the scheduler between polls (a restarted
    scheduler starts again from the next step's `step_seconds`)."""

    def __init__(self, window_steps: int = WINDOW_STEPS) -> None:
        self.window_steps = window_steps
        self._windows: dict[str, deque[Point]] = {}

    def update(self, job_id: str, events: Sequence[dict[str, Any]]) -> int | None:
        """The job's estimate after these newly polled events; None when they hold no step."""
        steps = [
            e["data"]
            for e in events
            if e["type"] == "metrics"
            and {"time", "step", "total_steps"} <= (e["data"] or {}).keys()
        ]
        if not steps:
            return None
        window = self._windows.setdefault(job_id, deque(maxlen=self.window_steps))
        for data in steps:
            if window and data["step"] <= window[-1][1]:
                window.clear()  # an attempt resumed from an earlier step: measure afresh
            window.append((float(data["time"]), int(data["step"])))
        newest = steps[-1]
        return estimate_finish(
            window, int(newest["total_steps"]), float(newest.get("step_seconds") or 0.0)
        )

    def forget(self, job_id: str) -> None:
        self._windows.pop(job_id, None)
