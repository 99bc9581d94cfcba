"""Where pack hosts go and what the cluster is asked for (orchestrator.scheduling.node_choice):
hosts on control nodes (marked, else the head), never a draining node's resources counted
free, and the autoscaler asked for a shape that fits nowhere, its jobs told once. Pure parts
and the in-memory hosts (milliseconds); the Ray side in tests/orchestrator/test_host_placement.py.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.scheduling.node_choice import (
    HEAD_MARKER,
    HostPlacement,
    NodeView,
    autoscaler_request,
    free_per_node,
    host_placement,
)
from tests.orchestrator.test_host_scheduling import make_world, run_until_done

CONTROL = "lorafleet-control"


def node(node_id: str, status: str = "RUNNING", head: bool = False, **resources: float) -> NodeView:
    total = {**resources, **({HEAD_MARKER: 1.0} if head else {})}
    return NodeView(node_id, f"10.0.0.{len(node_id)}", status, total, dict(total))


def test_hosts_go_to_marked_control_nodes_before_the_head() -> None:
    nodes = [node("head", head=True), node("ctl", **{CONTROL: 1.0}), node("gpu", GPU=8.0)]
    assert host_placement(nodes, CONTROL) == HostPlacement(resource=CONTROL)


def test_without_a_marked_node_hosts_are_pinned_to_the_head() -> None:
    nodes = [node("w1", CPU=2.0), node("head", head=True), node("w2", CPU=2.0)]
    assert host_placement(nodes, CONTROL) == HostPlacement(node_id="head")
    # Not a worker node, even when the operator's resource name matches nothing.
    assert host_placement(nodes, "") == HostPlacement(node_id="head")


def test_a_draining_control_node_still_keeps_hosts_off_worker_nodes() -> None:
    nodes = [node("ctl", "DRAINING", **{CONTROL: 1.0}), node("w1", CPU=4.0)]
    assert host_placement(nodes, CONTROL) == HostPlacement(resource=CONTROL)


def test_draining_and_dead_nodes_have_no_free_resources() -> None:
    nodes = [
        node("a", CPU=2.0, GPU=1.0),
        node("b", "DRAINING", CPU=8.0),
        node("c", "IDLE", CPU=1.0),
        node("d", "DEAD", CPU=8.0),
        node("head", head=True),  # no CPUs: an empty node, nothing placeable
    ]
    assert free_per_node(nodes) == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}, {}]


def test_the_request_covers_the_hosts_up_and_is_withdrawn_when_all_fit() -> None:
    up = [[{"CPU": 1.0}, {"CPU": 1.0}]]
    waiting = [[{"CPU": 1.0, "GPU": 1.0}] * 2]
    assert autoscaler_request(up, waiting) == up[0] + waiting[0]
    assert autoscaler_request(up, []) == []


def test_a_shape_that_fits_nowhere_asks_the_autoscaler_and_says_so_once(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_concurrent_runs=4, max_slots_per_host=1)
    world.hosts.nodes = [{"CPU": 2.0}]  # room for one 2-worker host
    first, second = world.submit(), world.submit()
    for _ in range(3):
        world.tick()
    running = first if world.job(first).status == "running" else second
    waiting = second if running == first else first
    assert world.job(waiting).status == "queued"
    # One request, while it lasts: the host up and the one that waits (the whole cluster).
    assert world.hosts.requested == [[{"CPU": 1.0}] * 4]
    told = [e for e in world.events(waiting) if "autoscaler" in e.message]
    assert len(told) == 1 and told[0].level == "warn"
    assert told[0].data["requested_bundles"] == [{"CPU": 1.0}] * 2
    assert not [e for e in world.events(running) if "autoscaler" in e.message]
    # Room again: the waiting job starts and the request is withdrawn.
    run_until_done(world, [running])
    world.tick()
    assert world.job(waiting).status == "running"
    assert world.hosts.requested[-1] == []
    run_until_done(world, [waiting])
    assert world.job(waiting).status == "succeeded"
    assert len([e for e in world.events(waiting) if "autoscaler" in e.message]) == 1
