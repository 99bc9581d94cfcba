"""Helpers for tests that drive training runs on Ray directly (no control plane)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.object_keys import adapter_key
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, RunSpec
from workers.run_actor import NAMESPACE, RUNNING, RunActor, run_actor_name


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
    precision: str = "fp32",
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
        precision=precision,
    )


def adapter(
    store: ObjectStoreConfig, tenant: str, job_id: str, attempt: int = 1
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    raw = open_object_store(store).get_bytes(
        adapter_key(tenant, job_id, attempt, "adapter_model.safetensors")
    )
    return load(raw)
