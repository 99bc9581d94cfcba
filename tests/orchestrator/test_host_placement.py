"""A new pack host starts only where the cluster has free resources for its workers' bundles,
not only below `max_concurrent_runs`: otherwise the job waits queued (no placement group
left pending). In memory (milliseconds), and the Ray hosts' report of free resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.host_protocol import HostShape
from orchestrator.scheduling.placement import bundles_of, free_after_unplaced, place
from tests.conftest import wait_for_condition
from tests.orchestrator.test_host_scheduling import make_world, run_until_done


def shape(workers: int, gpu: bool = False) -> HostShape:
    return HostShape("tiny", "/m", workers, gpu, "fp32")


def test_a_host_fits_when_each_worker_bundle_fits_on_some_node() -> None:
    nodes = [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert place(bundles_of(shape(3)), nodes) == [{"CPU": 0.0}, {"CPU": 0.0, "GPU": 1.0}]
    assert place(bundles_of(shape(4)), nodes) is None
    assert place(bundles_of(shape(1, gpu=True)), nodes) == [
        {"CPU": 1.0},
        {"CPU": 1.0, "GPU": 0.0},
    ]
    assert place(bundles_of(shape(2, gpu=True)), nodes) is None  # one GPU in the cluster


def test_a_started_host_not_yet_placed_counts_as_using_its_bundles() -> None:
    report = {"alive": True, "worker_starts": 0, "shape": shape(2)}
    placed = {**report, "worker_starts": 1}  # already in Ray's free figures
    assert free_after_unplaced([{"CPU": 3.0}], [report, placed]) == [{"CPU": 1.0}]  # type: ignore[list-item]


def test_a_job_waits_for_resources_and_starts_once_a_host_frees_them(tmp_path: Path) -> None:
    # Settings allow 4 hosts and one job per host, but the cluster has 2 CPUs: one host.
    world = make_world(tmp_path, max_concurrent_runs=4, max_slots_per_host=1)
    world.hosts.nodes = [{"CPU": 2.0}]
    first, second = world.submit(), world.submit()
    world.tick()
    world.tick()
    assert len(world.hosts.started) == 1
    assert {world.job(first).status, world.job(second).status} == {"running", "queued"}
    running = first if world.job(first).status == "running" else second
    waiting = second if running == first else first
    run_until_done(world, [running])
    world.tick()
    assert world.job(waiting).status == "running"
    run_until_done(world, [waiting])
    assert world.job(waiting).status == "succeeded"


def test_a_warm_host_is_not_started_without_room(tmp_path: Path) -> None:
    world = make_world(tmp_path, warm_hosts=1)
    world.hosts.nodes = [{"CPU": 1.0}]  # the default shape needs 2 workers
    world.tick()
    assert world.hosts.started == []


@pytest.mark.slow
def test_ray_hosts_report_the_free_cpus_of_each_node(ray_address: str) -> None:
    import ray

    from orchestrator.scheduling.ray_hosts import RayHosts

    free = RayHosts().free_resources()
    assert len(free) == len([n for n in ray.nodes() if n["Alive"]])
    cluster = ray.cluster_resources()["CPU"]

    def free_cpus() -> float:
        return sum(node.get("CPU", 0.0) for node in RayHosts().free_resources())

    held = ray.util.placement_group([{"CPU": 1.0}])
    ray.get(held.ready(), timeout=60)
    try:
        # Read per node through the autoscaler SDK, it agrees with Ray's own cluster-wide
        # figure (both follow the raylets' reports within a moment; hosts of earlier tests
        # may still be giving their CPUs back) and counts the held CPU as taken.
        wait_for_condition(
            lambda: free_cpus() == ray.available_resources().get("CPU", 0.0) <= cluster - 1,
            timeout=30,
            what="the held CPU counted",
        )
    finally:
        ray.util.remove_placement_group(held)
