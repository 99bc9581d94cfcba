"""A pack host killed with ray.kill leaves its placement group reserved (Ray without its
dashboard does not release it); the scheduler's reap removes it and its CPUs are free
again. A placement group that is not one of our hosts' is never touched. Real Ray Train host
on the session's cluster (tiny model, 2 workers)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import ray

from core.host_protocol import AdmissionRequest, HostShape, HostSpec, host_actor_name
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, LoraSettings, TrainingSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from orchestrator.settings import Settings
from tests.conftest import wait_for_condition
from workers.runtime.placement_groups import recorded_placement_groups

pytestmark = pytest.mark.slow


def free_cpus() -> float:
    return float(ray.available_resources().get("CPU", 0.0))


def group_state(group_id: str) -> str:
    return str(ray.util.placement_group_table().get(group_id, {}).get("state", "REMOVED"))


def long_job_on_a_host(host_id: str, tiny_base: Path, tmp_path: Path) -> tuple[HostSpec, JobSpec]:
    store = ObjectStoreConfig(url=str(tmp_path / "objects"))
    rows = [{"text": f"the {w} is {w[::-1]}"} for w in ("cat", "river", "stone", "cloud") * 4]
    open_object_store(store).put_bytes(
        "files/pg/data.jsonl", "\n".join(json.dumps(r) for r in rows).encode()
    )
    job = JobSpec(
        job_id=f"{host_id}-job",
        tenant="pg",
        attempt=1,
        base_model="tiny-llama",
        base_model_uri=str(tiny_base),
        training_file_key="files/pg/data.jsonl",
        lora=LoraSettings(r=4, alpha=8),
        training=TrainingSettings(n_epochs=500, batch_size=4, max_seq_len=32),
    )
    host = HostSpec(
        host_id=host_id,
        shape=HostShape("tiny-llama", str(tiny_base), 2, use_gpu=False, precision="fp32"),
        object_store=store,
        model_cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "ray",
    )
    return host, job


def test_reap_removes_a_killed_hosts_placement_group(
    ray_address: str, tiny_base: Path, tmp_path: Path
) -> None:
    settings = Settings(ray_namespace=ray.get_runtime_context().namespace)
    hosts = RayHosts(settings)
    foreign = ray.util.placement_group([{"CPU": 0.5}])  # another user's, on the same cluster
    ray.get(foreign.ready(), timeout=60)
    free_before = free_cpus()

    host_id = f"pg-{uuid.uuid4().hex[:8]}"
    spec, job = long_job_on_a_host(host_id, tiny_base, tmp_path)
    hosts.start_host(spec)
    assert hosts.admit(host_id, AdmissionRequest(job)).admitted
    owner = host_actor_name(host_id)

    def recorded() -> list[str]:
        groups = recorded_placement_groups(settings.ray_namespace).items()
        return [group_id for group_id, name in groups if name == owner]

    wait_for_condition(lambda: bool(recorded()), timeout=180, what="the host's placement group")
    [group_id] = recorded()
    assert group_state(group_id) == "CREATED"
    assert free_cpus() <= free_before - 2  # one CPU per worker

    ray.kill(ray.get_actor(owner, namespace=settings.ray_namespace))
    wait_for_condition(lambda: host_id not in hosts.list_hosts(), timeout=30, what="it gone")
    assert group_state(group_id) == "CREATED", "Ray released it itself: nothing to test"

    hosts.reap()
    wait_for_condition(
        lambda: group_state(group_id) == "REMOVED" and free_cpus() == free_before,
        timeout=30,
        what="the placement group removed and its CPUs free",
    )
    assert group_id not in recorded_placement_groups(settings.ray_namespace)
    assert group_state(foreign.id.hex()) == "CREATED", "reap removed another user's group"
    ray.util.remove_placement_group(foreign)
