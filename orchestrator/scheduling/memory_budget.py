"""What memory each rank of a pack host may fill: from what the cluster says, less a reserve.

On a GPU a rank has one device to itself: that device's memory. On CPU the ranks on a node
share its memory: Ray's `memory` resource of the node (what Ray leaves to workers' heaps
beside its object store) split over as many ranks as the node has CPUs, since each worker
takes one. Either way less the stated reserve (`host_memory_reserve_fraction` of it, then
`host_memory_reserve_bytes`): what the estimate does not count (the interpreter and its
libraries, a CUDA context, the allocator's slack). `host_memory_bytes`, when set, is every
rank's budget instead. The Ray shell (`ray_node_memory`) is kept apart from the pure rules.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass

from orchestrator.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeMemory:
    """One node, as the cluster describes it."""

    memory_bytes: int  # Ray's `memory` resource: the heap its workers may take
    cpus: int
    gpus: int = 0
    gpu_memory_bytes: int = 0  # per device; 0: not known


def rank_budget(node: NodeMemory, use_gpu: bool, settings: Settings) -> int:
    """Bytes one rank of a host may fill on this node (0: it cannot hold such a rank)."""
    if use_gpu:
        capacity = node.gpu_memory_bytes if node.gpus else 0
    else:
        capacity = node.memory_bytes // node.cpus if node.cpus >= 1 else 0
    kept = int(capacity * (1 - settings.host_memory_reserve_fraction))
    return max(0, kept - settings.host_memory_reserve_bytes)


@dataclass(frozen=True)
class RankBudgets:
    """The per-rank budgets a cluster gives hosts of either kind."""

    settings: Settings
    nodes: tuple[NodeMemory, ...]

    def _per_node(self, use_gpu: bool) -> list[int]:
        """Each node's budget, over the nodes that could hold a worker and whose memory is
        known (a GPU node whose devices could not be asked is left out, not counted as 0)."""
        able = [
            n
            for n in self.nodes
            if n.cpus >= 1 and (n.gpu_memory_bytes > 0 if use_gpu else n.memory_bytes > 0)
        ]
        return [rank_budget(n, use_gpu, self.settings) for n in able]

    def host(self, use_gpu: bool) -> int | None:
        """A new host's budget per rank: the smallest among the nodes that could hold one of
        its workers (Ray may place them on any). None: the cluster named no such node."""
        if self.settings.host_memory_bytes:
            return self.settings.host_memory_bytes
        budgets = self._per_node(use_gpu)
        return min(budgets) if budgets else None

    def largest(self, use_gpu: bool) -> int | None:
        """The most any host could ever be given per rank (a job above it never fits)."""
        if self.settings.host_memory_bytes:
            return self.settings.host_memory_bytes
        budgets = self._per_node(use_gpu)
        return max(budgets) if budgets else None


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
