"""Validation's pure parts: when a job is evaluated, on which rows, early stopping's rule, the
evaluation's loss and token accuracy (equal to the plain ones, from the same chunks), and
checkpoint retention that never prunes early stopping's best."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.checkpoint_index import list_checkpoints, prune_checkpoints
from core.objectstore import ObjectStoreConfig, open_object_store
from workers.host.evaluation import Evaluation, Validation, evaluation_steps, sample_indices
from workers.training.chunked_loss import (
    IGNORE_INDEX,
    chunked_loss_sum_and_accuracy,
    chunked_token_accuracy,
)


def test_evaluations_are_evenly_spaced_and_the_last_is_at_the_end() -> None:
    assert evaluation_steps(100, 10) == {10, 20, 30, 40, 50, 60, 70, 80, 90, 100}
    assert evaluation_steps(7, 3) == {3, 5, 7}
    assert evaluation_steps(4, 10) == {1, 2, 3, 4}  # fewer steps than evaluations
    assert evaluation_steps(50, 0) == frozenset()


def test_the_sample_is_fixed_by_the_seed_and_the_whole_of_a_small_file() -> None:
    assert sample_indices(10, seed=1) == list(range(10))
    first = sample_indices(1000, seed=1)
    assert first == sample_indices(1000, seed=1) != sample_indices(1000, seed=2)
    assert len(set(first)) == 64 and first == sorted(first)


def finished(step: int, loss: float) -> Evaluation:
    return Evaluation("sample", step, [0], position=1, sums=[loss * 10, 5.0, 10.0])


def test_early_stopping_waits_patience_evaluations_without_improvement() -> None:
    validation = Validation(examples=[], sample=[0], steps=frozenset(), chunk_rows=4, patience=2)
    assert validation.finish(finished(1, 2.0))  # the first is the best so far
    assert validation.finish(finished(2, 1.5))
    assert not validation.finish(finished(3, 1.5))  # equal is no improvement
    assert not validation.stopped_early
    assert not validation.finish(finished(4, 1.7))
    assert validation.stopped_early and (validation.best_step, validation.best_loss) == (2, 1.5)
    assert validation.latest == {"valid_loss": 1.7, "valid_mean_token_accuracy": 0.5}
    resumed = Validation(examples=[], sample=[0], steps=frozenset(), chunk_rows=4, patience=2)
    resumed.restore(validation.state())
    assert (resumed.best_step, resumed.since_best, resumed.latest) == (2, 2, validation.latest)
    # Step 4's evaluation is done: a job resumed from its checkpoint does not repeat it.
    assert resumed.done_step == validation.done_step == 4


def test_without_patience_nothing_stops_and_the_full_pass_has_its_own_names() -> None:
    validation = Validation(examples=[], sample=[0], steps=frozenset({5}), chunk_rows=4)
    for loss in (1.0, 2.0, 3.0, 4.0):
        assert not validation.finish(finished(5, loss))
    assert not validation.stopped_early
    validation.start(5, total_steps=5)
    assert [e.kind for e in validation.queue] == ["sample", "full"]
    full = Evaluation("full", 5, [0], position=1, sums=[3.0, 1.0, 4.0])
    validation.finish(full)
    assert validation.latest["full_valid_loss"] == 0.75
    assert validation.latest["full_valid_mean_token_accuracy"] == 0.25


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_evaluation_sums_equal_the_plain_loss_and_accuracy(chunk_tokens: int) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=generator)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX
    flat_logits, flat_labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    counted = flat_labels != IGNORE_INDEX
    plain_loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    plain_right = (flat_logits.argmax(-1)[counted] == flat_labels[counted]).sum()
    loss_sum, right, tokens = chunked_loss_sum_and_accuracy(logits, labels, chunk_tokens).tolist()
    assert tokens == counted.sum().item()
    assert math.isclose(loss_sum / tokens, plain_loss.item(), rel_tol=1e-6)
    assert right == plain_right.item()
    assert chunked_token_accuracy(logits, labels, chunk_tokens)[0].item() == right


def test_retention_never_prunes_the_best_checkpoint(tmp_path: object) -> None:
    store = open_object_store(ObjectStoreConfig(url=str(tmp_path)))
    for step in range(1, 6):
        prefix = f"runs/t/job/attempt-1/checkpoints/step-{step}/"
        store.put_bytes(prefix + "manifest.json", b'{"metrics": {}}')
    prune_checkpoints(store, "t", "job", 1, keep_last=2, keep_step=2)
    assert [c.step for c in list_checkpoints(store, "t", "job")] == [5, 4, 2]
