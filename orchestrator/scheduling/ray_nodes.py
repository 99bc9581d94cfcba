"""What the connected Ray cluster says of its nodes' memory (the budgets' source,
orchestrator.scheduling.memory_budget): each alive node's `memory` resource and CPUs, and a
GPU node's device memory, asked of the node itself (Ray's resources do not carry it)."""

from __future__ import annotations

import logging
import subprocess
import time

from orchestrator.scheduling.memory_budget import NodeMemory

log = logging.getLogger(__name__)


def ray_node_memory() -> list[NodeMemory]:
    """The alive nodes of the connected Ray cluster (`ray.nodes()`); a GPU node's device
    memory is asked of the node itself once (Ray's resources do not carry it)."""
    import ray

    if not ray.is_initialized():  # not connected (yet): nothing said, never a Ray started here
        raise RuntimeError("not connected to Ray")
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        gpus = int(resources.get("GPU", 0))
        nodes.append(
            NodeMemory(
                memory_bytes=int(resources.get("memory", 0)),
                cpus=int(resources.get("CPU", 0)),
                gpus=gpus,
                gpu_memory_bytes=_gpu_memory(node["NodeID"]) if gpus else 0,
            )
        )
    return nodes


_gpu_memory_by_node: dict[str, int] = {}
_gpu_memory_unknown_until: dict[str, float] = {}  # node -> when to ask it again
GPU_MEMORY_RETRY_S = 300.0


def _gpu_memory(node_id: str) -> int:
    """The smallest device's memory on a node (nvidia-smi there, in a task pinned to it
    that takes no GPU, so it never waits for one); 0 (unknown: the node gets no budget) if it
    cannot tell, which is logged, and it is asked again only after GPU_MEMORY_RETRY_S."""
    if node_id in _gpu_memory_by_node:
        return _gpu_memory_by_node[node_id]
    if time.monotonic() < _gpu_memory_unknown_until.get(node_id, float("-inf")):
        return 0
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_smallest_gpu_memory).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    try:
        _gpu_memory_by_node[node_id] = ray.get(probe.remote(), timeout=30)
    except Exception as exc:  # noqa: BLE001 - a node that cannot tell gets no budget
        log.warning("GPU memory of node %s unknown (%s); no host budget there", node_id, exc)
        _gpu_memory_unknown_until[node_id] = time.monotonic() + GPU_MEMORY_RETRY_S
        return 0
    return _gpu_memory_by_node[node_id]


def _smallest_gpu_memory() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    return min(int(line) for line in out.split()) * 1024 * 1024  # MiB
