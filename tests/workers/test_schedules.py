"""A job's learning rates equal transformers' own schedule functions, step for step, as the
host's slot applies them, reports them and resumes them from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from core.spec import JobSpec, TrainingSettings
from workers.host.slot import JobSlot
from workers.training.schedules import warmup_steps_of

TRANSFORMERS = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda optimizer, warmup, _total: get_constant_schedule_with_warmup(
        optimizer, warmup
    ),
}
LR = 3e-4


def transformers_rates(scheduler: str, warmup: int, total: int) -> list[float]:
    """The rate of each of `total` optimizer steps under transformers' schedule."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = TRANSFORMERS[scheduler](optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def slot_of(training: TrainingSettings, total: int) -> JobSlot:
    spec = JobSpec("ftjob-s", "t", 0, "tiny", "/nowhere", "files/t/f.jsonl", training=training)
    slot = JobSlot(spec=spec, examples=[], batches=[[0]] * total, micro_batch=1)
    slot.setup_optimizer([torch.nn.Parameter(torch.ones(4))])
    return slot


def take_steps(slot: JobSlot, steps: int) -> list[float]:
    """The rate each step's metrics event reports (JobSlot.learning_rate after the step)."""
    rates = []
    for _ in range(steps):
        slot.params[0].grad = torch.full_like(slot.params[0], 0.1)
        slot.apply_gradients()
        rates.append(slot.learning_rate)
    return rates


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 12), (5, 5), (9, 4)])
def test_the_slot_applies_and_reports_transformers_rates(
    scheduler: str, warmup: int, total: int
) -> None:
    training = TrainingSettings(learning_rate=LR, lr_scheduler=scheduler, warmup_steps=warmup)
    assert take_steps(slot_of(training, total), total) == transformers_rates(
        scheduler, warmup, total
    )


def test_a_warmup_ratio_rounds_up_as_the_trainer_does_and_resumes_in_step() -> None:
    training = TrainingSettings(learning_rate=LR, lr_scheduler="cosine", warmup_ratio=0.1)
    assert warmup_steps_of(training, 25) == 3  # ceil(2.5)
    assert warmup_steps_of(TrainingSettings(warmup_steps=4), 25) == 4
    expected = transformers_rates("cosine", 3, 25)
    first = slot_of(training, 25)
    before = take_steps(first, 10)
    # A resumed attempt (a checkpoint's schedule state into a new slot) goes on in step.
    resumed = slot_of(training, 25)
    resumed.restore(first.training_state())
    assert before + take_steps(resumed, 15) == expected


@pytest.mark.parametrize(
    ("wanted", "total", "steps"),
    [(4, 12, [3, 6, 9]), (3, 10, [4, 7]), (1, 10, []), (5, 3, [1, 2]), (None, 6, [2, 4])],
)
def test_n_checkpoints_are_evenly_spaced_before_the_adapter(
    wanted: int | None, total: int, steps: list[int]
) -> None:
    """n_checkpoints: checkpoints at ceil(i·total/n) for i < n (the n-th is the adapter);
    unset: at each epoch's end (3 epochs here), the last one being the adapter."""
    slot = slot_of(TrainingSettings(n_checkpoints=wanted), total)
    due = []
    for step in range(1, total + 1):
        slot.step = step
        if slot.checkpoint_due(every_steps=0):
            due.append(step)
    assert due == steps
