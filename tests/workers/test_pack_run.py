"""A pack on the real stack (Ray Train, 2 workers, DeepSpeed ZeRO-3, fp32): every job's
adapter equals the one it gets when trained alone, a short job leaves early, cancelling
one job changes nothing for the others, and the frozen base is held once per rank."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.layout import adapter_key
from workers.objectstore import ObjectStoreConfig, open_object_store
from workers.run_actor import CANCELLED, NAMESPACE, RUNNING, SUCCEEDED, RunActor, run_actor_name
from workers.spec import JobSpec, LoraSettings, RunSpec, TrainingSettings

pytestmark = pytest.mark.slow


def dataset(kind: int, n: int) -> bytes:
    if kind == 0:
        rows = [{"prompt": f"{i}+{i % 3}=", "completion": str(i + i % 3)} for i in range(n)]
    elif kind == 1:
        rows = [
            {"text": f"the {w} is {w[::-1]}"} for w in ("cat", "river", "stone", "cloud") * (n // 4)
        ]
    else:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"shout {w}"},
                    {"role": "assistant", "content": w.upper()},
                ]
            }
            for w in ("apple", "green", "light", "music", "paper", "ocean")[:n]
        ]
    return "\n".join(json.dumps(r) for r in rows).encode()


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


def run(
    spec: RunSpec, on_poll: Any = None, timeout: float = 300
) -> dict[str, list[dict[str, Any]]]:
    """Runs a spec on Ray and returns each job's events; on_poll sees every state snapshot."""
    import ray

    actor = RunActor.options(
        name=run_actor_name(spec.run_id), namespace=NAMESPACE, lifetime="detached"
    ).remote(spec)  # type: ignore[attr-defined]
    ray.get(actor.start.remote())
    events: dict[str, list[dict[str, Any]]] = {j.job_id: [] for j in spec.jobs}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            states = {}
            for job_id, seen in events.items():
                polled = ray.get(actor.poll.remote(job_id, len(seen)))
                seen.extend(polled["events"])
                states[job_id] = polled["state"]
            if on_poll:
                on_poll(actor, states, events)
            if all(s != RUNNING for s in states.values()) and ray.get(actor.finished.remote()):
                return {"states": states, **events}  # type: ignore[dict-item]
            time.sleep(0.1)
        raise AssertionError(f"run {spec.run_id} did not end: {states}")
    finally:
        ray.kill(actor)


@pytest.fixture(scope="module")
def store_config(tmp_path_factory: pytest.TempPathFactory) -> ObjectStoreConfig:
    config = ObjectStoreConfig(url=str(tmp_path_factory.mktemp("objects")))
    store = open_object_store(config)
    for kind, n in ((0, 24), (1, 16), (2, 6)):
        store.put_bytes(f"files/shared/data-{kind}.jsonl", dataset(kind, n))
    return config


def spec_for(
    run_id: str,
    jobs: list[JobSpec],
    tiny_base: Path,
    store: ObjectStoreConfig,
    tmp: Path,
    tenant: str,
) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        jobs=tuple(replace(j, base_model_uri=str(tiny_base), tenant=tenant) for j in jobs),
        num_workers=2,
        use_gpu=False,
        object_store=store,
        model_cache_dir=tmp / "cache",
        storage_path=tmp / "ray",
        zero3_param_persistence_threshold=0,
    )


def adapter(store: ObjectStoreConfig, tenant: str, job_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    raw = open_object_store(store).get_bytes(
        adapter_key(tenant, job_id, "adapter_model.safetensors")
    )
    return load(raw)


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
