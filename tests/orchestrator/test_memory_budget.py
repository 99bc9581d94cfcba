"""Memory admission on by default: each rank's budget from what the cluster says (less the
stated reserve), a job no host could hold refused at submission (400, nothing stored), and two
schedulers racing into one host never filling it past its budget (the host refuses)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.scheduling.host_scheduling import HostScheduling
from orchestrator.scheduling.memory_budget import NodeMemory, RankBudgets, rank_budget
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from tests.orchestrator.test_host_scheduling import World, make_world

GIB = 1024**3


def settings_with(**overrides: Any) -> Settings:
    return Settings(data_dir=Path("/nonexistent"), **overrides)


def test_a_cpu_rank_gets_its_share_of_the_node_less_the_reserve() -> None:
    settings = settings_with(host_memory_reserve_fraction=0.1, host_memory_reserve_bytes=GIB)
    node = NodeMemory(memory_bytes=64 * GIB, cpus=8)
    # Each worker takes a CPU, so up to 8 ranks share the node's 64 GiB.
    assert rank_budget(node, use_gpu=False, settings=settings) == int(8 * GIB * 0.9) - GIB
    assert rank_budget(node, use_gpu=True, settings=settings) == 0  # no GPU there


def test_a_gpu_rank_gets_its_device_less_the_reserve() -> None:
    settings = settings_with(host_memory_reserve_fraction=0.05, host_memory_reserve_bytes=0)
    node = NodeMemory(memory_bytes=512 * GIB, cpus=64, gpus=8, gpu_memory_bytes=80 * GIB)
    assert rank_budget(node, use_gpu=True, settings=settings) == int(80 * GIB * 0.95)


def test_a_host_gets_the_smallest_node_budget_and_a_job_is_refused_above_the_largest() -> None:
    settings = settings_with(host_memory_reserve_fraction=0.0, host_memory_reserve_bytes=0)
    nodes = (NodeMemory(16 * GIB, 4), NodeMemory(64 * GIB, 4), NodeMemory(0, 0))
    budgets = RankBudgets(settings, nodes)
    assert budgets.host(use_gpu=False) == 4 * GIB  # Ray may place its workers on either
    assert budgets.largest(use_gpu=False) == 16 * GIB
    assert budgets.host(use_gpu=True) is None  # no GPU node: nothing known
    unasked = RankBudgets(settings, (NodeMemory(64 * GIB, 8, gpus=8, gpu_memory_bytes=0),))
    assert unasked.host(use_gpu=True) is None  # its devices' memory unknown: not a 0 budget
    pinned = RankBudgets(settings_with(host_memory_bytes=GIB), nodes)
    assert pinned.host(use_gpu=False) == pinned.largest(use_gpu=True) == GIB  # the override


# ---- at submission, over HTTP ------------------------------------------------------------
def submit(client: TestClient, max_seq_len: int) -> Any:
    body = "\n".join(json.dumps({"text": f"row {i}"}) for i in range(20)).encode()
    uploaded = client.post(
        "/v1/files", files={"file": ("data.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert uploaded.status_code == 200, uploaded.text
    return client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": uploaded.json()["id"],
            "hyperparameters": {"batch_size": 4},
            "training": {"max_seq_len": max_seq_len},
        },
    )


def test_a_job_no_host_could_hold_is_refused_at_submission(tmp_path: Path, tiny_base: Path) -> None:
    budget = 256 * 1024**2
    settings = Settings(
        data_dir=tmp_path / "state", base_models={"tiny": str(tiny_base)}, host_memory_bytes=budget
    )
    with TestClient(create_app(settings)) as client:
        refused = submit(client, max_seq_len=16_384)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "training.max_seq_len"
        assert error["code"] == "insufficient_memory"
        assert f"{budget:,} bytes per worker" in error["message"]  # the largest host
        estimate = int(error["message"].split("estimated ")[1].split(" bytes")[0].replace(",", ""))
        assert estimate > budget
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing stored
        accepted = submit(client, max_seq_len=64)
        assert accepted.status_code == 200, accepted.text


def test_an_api_without_a_cluster_or_a_budget_leaves_the_check_to_the_scheduler(
    tmp_path: Path, tiny_base: Path
) -> None:
    """A replica with no Ray and LORAFLEET_HOST_MEMORY_BYTES unset knows no budget: it takes
    the job (and says so in its log); the scheduler's never-fit check is the backstop."""
    settings = Settings(data_dir=tmp_path / "state", base_models={"tiny": str(tiny_base)})
    with TestClient(create_app(settings)) as client:
        assert submit(client, max_seq_len=16_384).status_code == 200


# ---- two schedulers racing into one host -------------------------------------------------
class ReadsThenRun:
    """A scheduler's store that runs `meanwhile` right after the scheduler's reads of the
    jobs (its queue, then those running): another scheduler's whole tick lands between this
    one's reads and its joins, as it can whenever two schedulers share a database."""

    def __init__(self, store: JobStore, meanwhile: Callable[[], None], reads: int = 2) -> None:
        self._store, self._meanwhile, self._reads = store, meanwhile, reads

    def jobs_with_status(self, statuses: Any) -> Any:
        found = self._store.jobs_with_status(statuses)
        self._reads -= 1
        if self._reads == 0:
            self._meanwhile()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def held_bytes(world: World, host_id: str) -> int:
    """What the host counts against its budget: its shard and its running members' shares."""
    membership = world.hosts.hosts[host_id].membership
    return membership.base_bytes_per_rank + sum(
        m.request.memory_bytes for m in membership.running()
    )


def test_two_schedulers_racing_into_one_host_never_exceed_its_budget(tmp_path: Path) -> None:
    probe = make_world(tmp_path / "probe")
    job = probe.job(probe.submit(max_seq_len=1024))
    sizing = probe.scheduling.sizing
    shape = sizing.shape_of(job)
    share, base = sizing.demand_bytes(shape, sizing.demand_of(job)), sizing.base_bytes(shape)
    # Room for three jobs by either count: the scheduler's (base terms + shares) and the
    # host's (its shard + shares, against the budget less the gathered parameters).
    world = make_world(
        tmp_path / "race",
        max_concurrent_runs=1,
        max_slots_per_host=8,
        host_memory_bytes=base + 3 * share + share // 2,
    )

    def submit(tenant: str) -> str:
        world.clock.shift += 1  # one second apart: the age order is certain
        return world.submit(tenant=tenant, max_seq_len=1024)

    first = [submit("t1"), submit("t2"), submit("t3")]
    world.hosts.job_steps[first[2]] = 1  # t3's job ends after one step
    a = world.scheduling
    world.tick()  # A starts the host and the three join, t1's first
    host_id = world.job(first[0]).run_id or ""
    assert all(world.job(j).run_id == host_id for j in first)
    world.hosts.step()
    budget = world.hosts.hosts[host_id].membership.spec.memory_budget_bytes
    assert budget > 0 and held_bytes(world, host_id) <= budget
    late_t2, late_t1 = submit("t2"), submit("t1")
    a.watch()  # t3's job has ended: room for one
    assert world.job(first[2]).status == "succeeded"

    # A and B order the waiting jobs differently (A started t1's job before t2's, so t1 goes
    # first; B, new, takes the oldest: t2's). B reads the jobs, A's whole tick runs (t1's
    # job joins), then B sends t2's job to the host it still sees room on. The host refuses.
    b = HostScheduling(world.settings, world.store, world.objects, world.hosts, clock=world.clock)
    b.watch()
    b.store = ReadsThenRun(world.store, meanwhile=a.launch)  # type: ignore[assignment]
    b.launch()
    assert world.job(late_t1).status == "running"
    assert world.job(late_t2).status == "queued"
    messages = [e.message for e in world.events(late_t2)]
    assert any("over budget" in m for m in messages), messages  # B did send it
    assert held_bytes(world, host_id) <= budget
    assert len(world.hosts.hosts[host_id].membership.running()) == 3

    # It joins once there is room again, and every job finishes within the budget.
    jobs = [*first, late_t2, late_t1]
    for _ in range(40):
        world.tick()
        world.hosts.step()
        assert held_bytes(world, host_id) <= budget
        if all(JobStatus(world.job(j).status).is_terminal() for j in jobs):
            break
    assert [world.job(j).status for j in jobs] == ["succeeded"] * 5


def test_a_job_whose_base_cannot_be_read_now_waits_instead_of_failing(tmp_path: Path) -> None:
    world = make_world(tmp_path, host_memory_bytes=GIB)
    weights = tmp_path / "tiny" / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()  # the base's files away for a moment (a store outage, say)
    job_id = world.submit()
    world.tick()
    world.tick()
    assert world.job(job_id).status == "queued"
    weights.write_bytes(kept)
    world.tick()
    assert world.job(job_id).status == "running"


@pytest.mark.slow
def test_ray_names_each_node_memory_and_cpus(ray_address: str) -> None:
    from orchestrator.scheduling.ray_nodes import ray_node_memory

    nodes = ray_node_memory()
    assert len(nodes) == 1 and nodes[0].cpus == 4 and nodes[0].memory_bytes > 0
    # A node's device memory is asked of the node itself (here, with no nvidia-smi, it cannot
    # tell: unknown, logged, not an error).
    import shutil

    import ray

    from orchestrator.scheduling.ray_nodes import _gpu_memory

    asked = _gpu_memory(ray.nodes()[0]["NodeID"])
    assert asked > 0 if shutil.which("nvidia-smi") else asked == 0
    settings = settings_with(host_memory_reserve_fraction=0.1, host_memory_reserve_bytes=0)
    largest = RankBudgets(settings, tuple(nodes)).largest(use_gpu=False)
    assert largest == int(nodes[0].memory_bytes // 4 * 0.9)
