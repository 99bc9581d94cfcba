"""A pack on the real stack (Ray Train, 2 workers, DeepSpeed ZeRO-3, fp32): every job's
adapter equals the one it gets when trained alone, a short job leaves early, cancelling
one job changes nothing for the others, and the frozen base is held once per rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.layout import adapter_key
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, LoraSettings, TrainingSettings
from tests.workers.conftest import adapter, run, spec_for
from workers.run_actor import CANCELLED, RUNNING, SUCCEEDED

pytestmark = pytest.mark.slow


def job(job_id: str, data: int, lora: LoraSettings, **training: Any) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        tenant="pack",
        attempt=1,
        base_model="tiny-llama",
        base_model_uri="",  # filled in by the test
        training_file_key=f"files/shared/data-{data}.jsonl",
        lora=lora,
        training=TrainingSettings(**{"batch_size": 4, "max_seq_len": 48, **training}),
    )


JOBS = [
    # Short, with a tight clip so clipping is active.
    job(
        "job-a",
        0,
        LoraSettings(r=4, alpha=8),
        n_epochs=1,
        learning_rate=1e-2,
        gradient_clip=0.05,
        seed=1,
    ),
    job(
        "job-b",
        1,
        LoraSettings(r=8, alpha=16),
        n_epochs=6,
        learning_rate=5e-3,
        gradient_clip=0.0,
        seed=2,
    ),
    job(
        "job-c",
        2,
        LoraSettings(r=2, alpha=4, target_modules=("q_proj", "v_proj")),
        n_epochs=4,
        batch_size=2,
        learning_rate=2e-2,
        gradient_clip=1.0,
        warmup_steps=2,
        seed=3,
    ),
]
CANCELLED_JOB = job(
    "job-d", 0, LoraSettings(r=4, alpha=4), n_epochs=100, learning_rate=1e-3, seed=4
)


def test_a_pack_trains_each_job_exactly_as_alone(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    observed: dict[str, Any] = {"a_done_while_b_ran": False, "cancel_sent": False}

    def watch(actor: Any, states: dict[str, str], events: dict[str, list[dict[str, Any]]]) -> None:
        if states["job-a"] == SUCCEEDED and states["job-b"] == RUNNING:
            observed["a_done_while_b_ran"] = True
        d_steps = [e for e in events["job-d"] if e["type"] == "metrics"]
        if len(d_steps) >= 3 and not observed["cancel_sent"]:
            actor.stop.remote("job-d")
            observed["cancel_sent"] = True

    packed = run(
        spec_for("pack-4", [*JOBS, CANCELLED_JOB], tiny_base, store_config, tmp_path, "pack"), watch
    )
    assert packed["states"] == {
        "job-a": SUCCEEDED,
        "job-b": SUCCEEDED,
        "job-c": SUCCEEDED,
        "job-d": CANCELLED,
    }
    assert observed["a_done_while_b_ran"], "the short job did not leave the pack early"
    assert not open_object_store(store_config).exists(adapter_key("pack", "job-d", "manifest.json"))
    a_norms = [e["data"]["grad_norm"] for e in packed["job-a"] if e["type"] == "metrics"]
    assert max(a_norms) > 0.05, "clipping was never active for job-a"

    # The same jobs, each alone in its own run (Ray schedules them as CPUs free up).
    alone_refs = []
    for j in JOBS:
        alone_refs.append(
            (
                j.job_id,
                spec_for(f"alone-{j.job_id}", [j], tiny_base, store_config, tmp_path, "alone"),
            )
        )
    alone = {job_id: run(spec) for job_id, spec in alone_refs}
    for j in JOBS:
        assert alone[j.job_id]["states"] == {j.job_id: SUCCEEDED}
        ours, reference = (
            adapter(store_config, "pack", j.job_id),
            adapter(store_config, "alone", j.job_id),
        )
        assert ours.keys() == reference.keys() and ours
        worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
        assert worst <= 1e-5, f"{j.job_id}: packed differs from alone by {worst}"
        assert any(t.abs().max() > 1e-4 for k, t in ours.items() if "lora_B" in k)

    # The frozen base is held once per rank whatever the pack size, and partitioned.
    def held(events: list[dict[str, Any]]) -> list[int]:
        [published] = [e for e in events if e["type"] == "published"]
        return sorted(p["base_bytes_held"] for p in published["data"]["partitioning"])

    k4, k1 = held(packed["job-a"]), held(alone["job-a"]["job-a"])
    assert k4 == k1
    total = sum(p.numel() * 4 for p in _base_parameters(tiny_base))
    assert all(0.45 * total <= h <= 0.55 * total for h in k4), (k4, total)


def _base_parameters(path: Path) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(path).parameters())
