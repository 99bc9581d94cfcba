"""What memory each rank of a pack host may fill: from what the cluster says, less a reserve.

On a GPU a rank has one device to itself: that device's memory. On CPU the ranks on a node
share its memory: Ray's `memory` resource of the node (what Ray leaves to workers' heaps
beside its object store) split over as many ranks as the node has CPUs, since each worker
takes one. Either way less the stated reserve (`host_memory_reserve_fraction` of it, then
`host_memory_reserve_bytes`): what the estimate does not count (the interpreter and its
libraries, a CUDA context, the allocator's slack). `host_memory_bytes`, when set, is every
rank's budget instead. Pure: what Ray says of its nodes is read in
`orchestrator.scheduling.ray_nodes` (an API replica never imports Ray).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.settings import Settings


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
