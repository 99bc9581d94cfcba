"""A job's learning-rate schedule: the factor of its learning rate at each step.

The formulas are transformers' own (`get_linear_schedule_with_warmup`,
`get_cosine_schedule_with_warmup`, `get_constant_schedule_with_warmup`, and
`TrainingArguments.get_warmup_steps` for a ratio), written out here as pure functions so
the rates a run reports are the ones people compare against, step for step
(tests/workers/test_schedules.py checks them against transformers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from core.job_settings import LrScheduler, TrainingSettings


def warmup_steps_of(training: TrainingSettings, total_steps: int) -> int:
    """The job's warm-up in steps: `warmup_ratio` of all steps (rounded up, as transformers'
    Trainer does) when given, else `warmup_steps`."""
    if training.warmup_ratio is not None:
        return math.ceil(total_steps * training.warmup_ratio)
    return training.warmup_steps


def lr_factor(scheduler: LrScheduler, step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based: the first optimizer step uses step 0)
    as a fraction of the job's learning rate."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if scheduler == "constant":
        return 1.0
    decay_steps = float(max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return max(0.0, float(total_steps - step) / decay_steps)
    progress = float(step - warmup_steps) / decay_steps  # cosine: half a wave, to 0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def schedule_of(training: TrainingSettings, total_steps: int) -> Callable[[int], float]:
    """The job's factor per step, for `torch.optim.lr_scheduler.LambdaLR`. A partial, not a
    closure, as transformers' are: LambdaLR's state dict then saves it (empty) and a
    checkpoint restores into it."""
    return partial(
        lr_factor,
        training.lr_scheduler,
        warmup_steps=warmup_steps_of(training, total_steps),
        total_steps=total_steps,
    )
