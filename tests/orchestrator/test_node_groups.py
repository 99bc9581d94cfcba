"""Bases on node groups (Settings.base_node_groups): a base's hosts' workers take a mark of
their group's resource, so the placement arithmetic fits them only on that group's nodes, a
shape whose group has no room asks the autoscaler for bundles with that resource, and a
malformed setting refuses to start. Pure parts and the in-memory hosts (milliseconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.host_protocol import HostShape
from orchestrator.scheduling.node_choice import NodeView, free_per_node
from orchestrator.scheduling.placement import bundles_of, place
from orchestrator.settings import Settings
from tests.orchestrator.test_host_scheduling import make_world, run_until_done

GROUP = "lorafleet-group:group-a"
MARK = {"CPU": 1.0, GROUP: 0.001}


def test_a_grouped_shape_bundles_a_mark_of_its_group_and_fits_only_on_its_nodes() -> None:
    shape = HostShape("a", "/models/a", 2, use_gpu=False, precision="fp32", node_group="group-a")
    assert bundles_of(shape) == [MARK, MARK]
    assert bundles_of(HostShape("b", "/models/b", 1, False, "fp32")) == [{"CPU": 1.0}]
    nodes = [
        NodeView("w1", "10.0.0.1", "RUNNING", {"CPU": 8.0}, {"CPU": 8.0}),
        NodeView("g1", "10.0.0.2", "RUNNING", {"CPU": 1.0, GROUP: 1.0}, {"CPU": 1.0, GROUP: 1.0}),
        NodeView("g2", "10.0.0.3", "DRAINING", {"CPU": 4.0, GROUP: 1.0}, {"CPU": 4.0, GROUP: 1.0}),
    ]
    free = free_per_node(nodes)  # the group's marks count; a draining node's do not
    assert free == [{"CPU": 8.0}, {"CPU": 1.0, GROUP: 1.0}]
    assert place(bundles_of(shape), free) is None  # 8 CPUs elsewhere, one in the group
    left = place(bundles_of(shape)[:1], free)
    assert left is not None and left[0] == {"CPU": 8.0} and left[1]["CPU"] == 0.0


def test_a_queued_base_whose_group_has_no_room_waits_and_asks_for_its_group(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, base_node_groups={"tiny": "group-a"})
    world.hosts.nodes = [{"CPU": 8.0}]  # room, but not in the base's group
    job_id = world.submit()
    for _ in range(2):
        world.tick()
    assert world.job(job_id).status == "queued" and not world.hosts.hosts
    assert world.hosts.requested == [[MARK, MARK]]
    world.hosts.nodes = [{"CPU": 8.0}, {"CPU": 2.0, GROUP: 1.0}]  # the group's node joins
    world.tick()
    assert world.job(job_id).status == "running"
    (host,) = world.hosts.hosts.values()
    assert host.spec.shape.node_group == "group-a"
    run_until_done(world, [job_id])
    assert world.job(job_id).status == "succeeded"


@pytest.mark.parametrize(
    ("groups", "said"),
    [
        ({"other": "g"}, "base 'other' is not in base_models (tiny)"),
        ({"tiny": "a group"}, "group 'a group' of base 'tiny' must be 1-63 letters"),
        ({"tiny": ""}, "group '' of base 'tiny'"),
    ],
)
def test_a_malformed_node_group_setting_refuses_to_start(groups: dict[str, str], said: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(base_models={"tiny": "/models/tiny"}, base_node_groups=groups)
    assert "base_node_groups" in str(raised.value) and said in str(raised.value)


def test_node_groups_are_read_from_json_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAFLEET_BASE_MODELS", '{"tiny": "/models/tiny"}')
    monkeypatch.setenv("LORAFLEET_BASE_NODE_GROUPS", '{"tiny": "group-a"}')
    assert Settings().base_node_groups == {"tiny": "group-a"}
    monkeypatch.setenv("LORAFLEET_BASE_NODE_GROUPS", '{"tiny": ')
    with pytest.raises(Exception, match="base_node_groups"):
        Settings()
