"""Which Ray placement groups are ours, so that the scheduler can remove a dead host's.

Ray Train removes a run's placement group when `fit()` returns, but not when the pack
host's actor that owns the run is killed while Ray runs without its dashboard, nor when its
cleaner process fails (seen: "Found multiple active Ray instances" on a machine with several
Ray clusters): the group then keeps its CPUs reserved until the job that created it ends.
Ray's placement-group table does not say which run a group belongs to, so rank 0 of each
pack host records its group under the owning actor's name in the cluster's key-value store (kept by
Ray itself, so it survives the actor). A group is removed only when it was recorded here
and its owner's named actor no longer exists: never another user's group.
"""

from __future__ import annotations

import ray
from ray.experimental import internal_kv
from ray.util.placement_group import PlacementGroup, remove_placement_group

KV_NAMESPACE = "lorafleet-placement-groups"


def _key(namespace: str, owner: str, group_id: str) -> str:
    return f"{namespace}/{owner}/{group_id}"


def record_placement_group(owner: str) -> str | None:
    """On a training worker: notes the placement group it runs in as `owner`'s (the run's or
    host's actor name, in this worker's Ray namespace). The group's id, or None outside one."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return None
    namespace = ray.get_runtime_context().namespace
    internal_kv._internal_kv_put(
        _key(namespace, owner, group.id.hex()), b"", overwrite=True, namespace=KV_NAMESPACE
    )
    return str(group.id.hex())


def recorded_placement_groups(namespace: str) -> dict[str, str]:
    """Group id → owner actor name, for every group recorded in `namespace`."""
    keys = internal_kv._internal_kv_list(f"{namespace}/", namespace=KV_NAMESPACE)
    recorded = {}
    for key in keys:
        _, owner, group_id = key.decode().rsplit("/", 2)
        recorded[group_id] = owner
    return recorded


def release_orphaned_placement_groups(namespace: str) -> list[str]:
    """Removes every recorded group whose owner actor is gone (killed, or reaped after its
    run ended); forgets the records of groups Ray has removed already. The removed ids."""
    table = ray.util.placement_group_table()
    removed = []
    for group_id, owner in recorded_placement_groups(namespace).items():
        if _owner_alive(owner, namespace):
            continue
        state = table.get(group_id, {}).get("state", "REMOVED")
        if state != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            removed.append(group_id)
        internal_kv._internal_kv_del(_key(namespace, owner, group_id), namespace=KV_NAMESPACE)
    return removed


def _owner_alive(owner: str, namespace: str) -> bool:
    try:
        ray.get_actor(owner, namespace=namespace)
    except ValueError:
        return False
    return True
