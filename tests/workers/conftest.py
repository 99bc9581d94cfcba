"""Helpers for tests that drive pack hosts on Ray directly (no control plane): the tiny
datasets, a host's spec, a watch that polls one host, and the adapters it published."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.host_protocol import AdmissionRequest, HostReport, HostShape, HostSpec, PackHosts
from core.object_keys import adapter_key
from core.objectstore import ObjectStoreConfig, open_object_store
from core.run_states import RunJobState
from core.spec import JobSpec, LoraSettings, TrainingSettings

RUNNING = RunJobState.RUNNING


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


@pytest.fixture(scope="module")
def store_config(tmp_path_factory: pytest.TempPathFactory) -> ObjectStoreConfig:
    config = ObjectStoreConfig(url=str(tmp_path_factory.mktemp("objects")))
    store = open_object_store(config)
    for kind, n in ((0, 24), (1, 16), (2, 6)):
        store.put_bytes(f"files/shared/data-{kind}.jsonl", dataset(kind, n))
    return config


def job(job_id: str, data: int, lora: LoraSettings, **training: Any) -> JobSpec:
    """A job on one of the shared datasets (`data`: 0, 1 or 2), its tenant and base unset."""
    return JobSpec(
        job_id=job_id,
        tenant="",  # set per use
        attempt=1,
        base_model="tiny-llama",
        base_model_uri="",  # the tiny base's folder, set per use
        training_file_key=f"files/shared/data-{data}.jsonl",
        lora=lora,
        training=TrainingSettings(**{"batch_size": 4, "max_seq_len": 48, **training}),
    )


def for_tenant(spec: JobSpec, tenant: str, tiny_base: Path) -> JobSpec:
    return replace(spec, tenant=tenant, base_model_uri=str(tiny_base))


def host_spec(
    tiny_base: Path,
    store: ObjectStoreConfig,
    tmp: Path,
    precision: str = "fp32",
    **options: Any,
) -> HostSpec:
    """A host of 2 CPU workers on the tiny base, every parameter partitioned (ZeRO-3)."""
    return HostSpec(
        host_id=f"test-{uuid.uuid4().hex[:8]}",
        shape=HostShape(
            "tiny-llama", str(tiny_base), num_workers=2, use_gpu=False, precision=precision
        ),
        object_store=store,
        model_cache_dir=tmp / "cache",
        storage_path=tmp / "ray",
        zero3_param_persistence_threshold=0,
        **{"idle_seconds": 3.0, "checkpoint_every_steps": 4, **options},
    )


class Watch:
    """Polls one host until every job it was given has ended, keeping each job's events."""

    def __init__(self, hosts: PackHosts, host_id: str) -> None:
        self.hosts, self.host_id = hosts, host_id
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.report: HostReport | None = None

    def poll(self) -> HostReport:
        cursors = {job_id: len(seen) for job_id, seen in self.events.items()}
        report = self.hosts.poll(self.host_id, cursors)
        assert report is not None, "the host disappeared"
        for job_id, polled in report["jobs"].items():
            seen = self.events.setdefault(job_id, [])
            assert [e["seq"] for e in polled["events"]] == list(
                range(len(seen), len(seen) + len(polled["events"]))
            )
            seen.extend(dict(e) for e in polled["events"])
        self.report = report
        return report

    def until(self, condition: Callable[[HostReport], bool], timeout: float = 300) -> HostReport:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.poll()
            if condition(report):
                return report
            time.sleep(0.1)
        raise AssertionError(f"timed out; last report: {self.report}")

    def steps(self, job_id: str) -> list[int]:
        return [e["data"]["step"] for e in self.events.get(job_id, []) if e["type"] == "metrics"]


def states(report: HostReport) -> dict[str, RunJobState]:
    return {job_id: job["state"] for job_id, job in report["jobs"].items()}


def all_ended(report: HostReport) -> bool:
    return bool(report["jobs"]) and all(j["state"] != RUNNING for j in report["jobs"].values())


def ended(job_id: str) -> Callable[[HostReport], bool]:
    return lambda r: job_id in r["jobs"] and r["jobs"][job_id]["state"] != RUNNING


def one_after_another(
    hosts: PackHosts, spec: HostSpec, jobs: list[JobSpec], watch: Watch | None = None
) -> Watch:
    """Trains `jobs` on the started host `spec`, each alone: the next is admitted once the
    one before has ended (as `packing: false` jobs, or a pack of one, train)."""
    watch = watch or Watch(hosts, spec.host_id)
    for one in jobs:
        assert hosts.admit(spec.host_id, AdmissionRequest(one)).admitted
        watch.until(ended(one.job_id))
    return watch


def free_placement_groups() -> None:
    """Removes placement groups left by ended hosts of this session's own cluster: with the
    dashboard off, Ray Train's cleaner cannot remove them (it fails to find "the" cluster
    when several run on the machine), and their CPUs would keep a new host from starting."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    for pg_id, info in placement_group_table().items():
        if info["state"] == "CREATED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))


def worst_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == reference.keys() and ours
    return max((ours[k] - reference[k]).abs().max().item() for k in ours)


def adapter(
    store: ObjectStoreConfig, tenant: str, job_id: str, attempt: int = 1
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    raw = open_object_store(store).get_bytes(
        adapter_key(tenant, job_id, attempt, "adapter_model.safetensors")
    )
    return load(raw)
