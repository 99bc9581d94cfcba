"""Validation on a real pack host (Ray Train, 2 workers, ZeRO-3, fp32), in one host run:

- job M (no validation file) trains alone, then again beside job E, which is evaluated at
  every step on a validation file larger than a chunk (so each evaluation spans several
  pack steps): M's adapter is bit-identical both times (an evaluation changes no mate);
- E's validation set is built to overfit (the answers its training data contradicts): early
  stopping ends it before its last epoch, its best checkpoint is kept, and the published
  adapter is that checkpoint's tensors.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.checkpoint_index import list_checkpoints
from core.host_protocol import AdmissionRequest
from core.objectstore import ObjectStoreConfig, open_object_store
from core.run_states import RunJobState
from core.spec import LoraSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from tests.workers.conftest import (
    Watch,
    adapter,
    all_ended,
    ended,
    for_tenant,
    free_placement_groups,
    host_spec,
    job,
    states,
)
from workers.training.checkpoints import read_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.long]
SUCCEEDED = RunJobState.SUCCEEDED
WORDS = ("apple", "green", "light", "music", "paper", "ocean")


def contradicting_validation() -> bytes:
    """Chat rows whose answers are the lower-case word the training data shouts: the more
    E learns to shout, the worse it does here (12 rows: 3 chunks of 4 per evaluation)."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"shout {w}"},
                {"role": "assistant", "content": f"{w} {w}"},
            ]
        }
        for w in WORDS * 2
    ]
    return "\n".join(json.dumps(r) for r in rows).encode()


# M: prompt/completion rows (width 16), never in a forward with E's chat rows (width 48).
MATE = job("mate", 0, LoraSettings(r=4, alpha=8, dropout=0.1), n_epochs=3, seed=5)
# E: 6 chat rows, 2 steps an epoch, 15 epochs; evaluated after every step, patience 3.
EVALUATED = replace(
    job(
        "evaluated",
        2,
        LoraSettings(r=8, alpha=16),
        n_epochs=15,
        learning_rate=3e-2,
        seed=7,
        n_evals=30,
        early_stopping_patience=3,
    ),
    validation_file_key="files/shared/contradicting.jsonl",
)


def events_of(watch: Watch, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in watch.events[job_id] if e["type"] == kind]


def test_evaluation_leaves_mates_bit_identical_and_early_stopping_publishes_the_best(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
) -> None:
    store = open_object_store(store_config)
    store.put_bytes(EVALUATED.validation_file_key or "", contradicting_validation())
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path, idle_seconds=60, checkpoint_every_steps=0)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    alone = for_tenant(replace(MATE, job_id="mate-alone"), "alone", tiny_base)
    packed = for_tenant(MATE, "packed", tiny_base)
    evaluated = for_tenant(EVALUATED, "packed", tiny_base)
    try:
        assert hosts.admit(spec.host_id, AdmissionRequest(alone)).admitted
        watch.until(ended("mate-alone"))
        alone_adapter = adapter(store_config, "alone", "mate-alone")
        assert hosts.admit(spec.host_id, AdmissionRequest(evaluated)).admitted
        assert hosts.admit(spec.host_id, AdmissionRequest(packed)).admitted
        report = watch.until(all_ended)
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()
    assert set(states(report).values()) == {SUCCEEDED}, report

    # (3) The mate trained beside evaluations and is bit-identical to itself alone.
    packed_adapter = adapter(store_config, "packed", "mate")
    assert packed_adapter.keys() == alone_adapter.keys()
    assert all(torch.equal(packed_adapter[k], alone_adapter[k]) for k in alone_adapter)
    mate_steps = events_of(watch, "mate", "metrics")
    assert {e["data"]["pack_size"] for e in mate_steps} == {1, 2}
    assert all(0 <= e["data"]["train_mean_token_accuracy"] <= 1 for e in mate_steps)

    # (2) Early stopping: before the last epoch, an event says so, best checkpoint published.
    *evaluations, published_step = [
        e["data"] for e in events_of(watch, "evaluated", "metrics") if "evaluation" in e["data"]
    ]
    assert {e["evaluation"] for e in evaluations} == {"sample"}  # it never reached its end
    trained = [
        e["data"] for e in events_of(watch, "evaluated", "metrics") if "evaluation" not in e["data"]
    ]
    total = trained[0]["total_steps"]
    assert total == 30 and evaluations
    assert [e["step"] for e in evaluations] == [e["step"] for e in trained]  # after each step
    for data in evaluations:
        assert {"valid_loss", "valid_mean_token_accuracy", "train_loss"} <= data.keys()
    [stopped] = [e for e in watch.events["evaluated"] if (e["data"] or {}).get("early_stopped")]
    stop_step, best_step = stopped["data"]["step"], stopped["data"]["best_step"]
    assert stop_step < total - 2  # before the last epoch (2 steps each)
    losses = {e["step"]: e["valid_loss"] for e in evaluations}
    assert losses[best_step] == min(losses.values()) == stopped["data"]["best_valid_loss"]
    assert all(losses[s] >= losses[best_step] for s in range(best_step + 1, stop_step + 1))
    assert stop_step - best_step == 3
    # Its last metrics are the published adapter's: the best step's (checkpoints.list's final).
    best_figures = next(e for e in evaluations if e["step"] == best_step)
    assert published_step == {**best_figures, "evaluation": "best", "time": published_step["time"]}
    saved = list_checkpoints(store, "packed", "evaluated")
    [best] = [c for c in saved if c.step == best_step]  # kept, whatever retention prunes
    assert best.metrics["valid_loss"] == losses[best_step]
    best_tensors, _ = read_checkpoint(store, best)
    published = adapter(store_config, "packed", "evaluated")
    assert published.keys() == best_tensors.keys()
    assert all(torch.equal(published[k], best_tensors[k]) for k in published)

    # Figures for the report: the mate's time per host step (between its metrics events, so
    # E's chunk of validation rows in that step counts), while E was being evaluated (the
    # mate trained alone in the step), while E trained beside it, and once E had left.
    ended_at = evaluations[-1]["time"]
    times: dict[str, list[float]] = {"evaluated": [], "beside": [], "after": []}
    for before, after in zip(mate_steps, mate_steps[1:], strict=False):
        data = after["data"]
        kind = (
            "after"
            if data["time"] > ended_at
            else ("beside" if data["pack_size"] == 2 else "evaluated")
        )
        times[kind].append(data["time"] - before["data"]["time"])
    medians = ", ".join(
        f"{kind} {statistics.median(t or [0]) * 1000:.1f} ms ({len(t)})"
        for kind, t in times.items()
    )
    print(f"\nE stopped at step {stop_step}/{total}, best {best_step}; mate per step: {medians}")
