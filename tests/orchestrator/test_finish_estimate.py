"""`estimated_finish`: a running job's steps left times its measured time per step."""

from __future__ import annotations

from typing import Any

from orchestrator.scheduling.finish_estimate import FinishEstimates


def step(n: int, time: float, total: int = 10, step_seconds: float = 0.5) -> dict[str, Any]:
    data = {"step": n, "total_steps": total, "time": time, "step_seconds": step_seconds}
    return {"type": "metrics", "message": "", "data": data}


def test_the_first_step_counts_its_own_time_then_the_measured_rate_takes_over() -> None:
    estimates = FinishEstimates(window_steps=3)
    assert estimates.update("j", [{"type": "message", "data": {"time": 1.0}}]) is None
    assert estimates.update("j", [step(1, 1000.0, step_seconds=2.0)]) == 1000 + 9 * 2
    # Steps 2 and 3 ended 2 s apart (the pack waits for more than the step itself).
    assert estimates.update("j", [step(2, 1002.0), step(3, 1004.0)]) == 1004 + 7 * 2
    # The window keeps the newest 3 steps: 4 s a step now.
    assert estimates.update("j", [step(4, 1012.0), step(5, 1020.0)]) == 1020 + 5 * 8
    assert estimates.update("j", [step(10, 1044.0)]) == 1044  # done: now


def test_a_resumed_attempt_measures_afresh_and_jobs_are_kept_apart() -> None:
    estimates = FinishEstimates()
    estimates.update("j", [step(5, 100.0), step(6, 110.0)])
    assert estimates.update("k", [step(1, 50.0, step_seconds=1.0)]) == 59
    assert estimates.update("j", [step(3, 500.0, step_seconds=2.0)]) == 500 + 7 * 2
    estimates.forget("j")
    assert estimates.update("j", [step(4, 600.0, step_seconds=3.0)]) == 600 + 6 * 3
