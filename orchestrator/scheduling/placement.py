"""A new pack host: its spec (from the settings), and whether the cluster has the free
resources for it, so a job that cannot be placed waits in the queue instead of in a
placement group that stays pending.

A host asks Ray for one bundle per worker: a CPU, and a GPU when it trains on GPUs (as
`workers.runtime.ray_trainer` asks for them), and a mark of its base's node group if it has
one (`Settings.base_node_groups`: only that group's nodes have the resource). Ray Train packs
the bundles but may spread them over nodes, so a host fits when each bundle fits, first come
first served, on some node's free resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from core.host_protocol import (
    NODE_GROUP_SHARE,
    HostReport,
    HostShape,
    HostSpec,
    node_group_resource,
)
from orchestrator.jobs import training_fields
from orchestrator.settings import Settings

Resources = dict[str, float]


def bundles_of(shape: HostShape) -> list[Resources]:
    bundle = {"CPU": 1.0, **({"GPU": 1.0} if shape.use_gpu else {})}
    if shape.node_group:
        bundle[node_group_resource(shape.node_group)] = NODE_GROUP_SHARE
    return [dict(bundle) for _ in range(shape.num_workers)]


def place(bundles: Iterable[Resources], nodes: Sequence[Resources]) -> list[Resources] | None:
    """The nodes' free resources once `bundles` are placed, or None if one fits nowhere."""
    left = [dict(node) for node in nodes]
    for bundle in bundles:
        node = next((n for n in left if all(n.get(k, 0.0) >= v for k, v in bundle.items())), None)
        if node is None:
            return None
        for key, amount in bundle.items():
            node[key] -= amount
    return left


def free_after_unplaced(
    nodes: Sequence[Resources], reports: Iterable[HostReport]
) -> list[Resources]:
    """Free resources less those of hosts started but not yet placed (no worker group yet):
    Ray does not count their placement groups until they are created."""
    left: list[Resources] = [dict(node) for node in nodes]
    for report in reports:
        if report["alive"] and not report["worker_starts"]:
            left = place(bundles_of(report["shape"]), left) or [{} for _ in left]
    return left


def host_spec(
    settings: Settings,
    host_id: str,
    shape: HostShape,
    *,
    warm: bool,
    exclusive: bool = False,
    memory_budget_bytes: int = 0,  # per rank (orchestrator.scheduling.sizing.spec_budget)
) -> HostSpec:
    """`exclusive`: a host for one `packing: false` job, of one slot that admits no one
    else, ending as soon as its job leaves (no idle wait: nobody else may use it)."""
    return HostSpec(
        host_id=host_id,
        shape=shape,
        max_slots=1 if exclusive else settings.max_slots_per_host,
        idle_seconds=0.0 if exclusive else settings.host_idle_seconds,
        warm=warm,
        exclusive=exclusive,
        memory_budget_bytes=memory_budget_bytes,
        setup_timeout_seconds=settings.setup_timeout_seconds,
        step_timeout_seconds=settings.step_timeout_seconds,
        max_job_restarts=settings.max_worker_restarts,
        max_job_preemptions=settings.max_preemptions_per_job,
        publish_retry_seconds=settings.publish_retry_seconds,
        **training_fields(settings),
    )
