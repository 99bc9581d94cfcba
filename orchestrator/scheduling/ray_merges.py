"""Merges on Ray (`orchestrator.merges.MergeRunner`): each one a task where the pack hosts
run, on a control node or else the head, so it reads the base from the same folder (or
cache of an s3:// base) they load it from.

The task asks for no CPU, as a host actor does: a 0-CPU head (the cluster layout of
RUNBOOK.md) must still run it, and it only streams one weight at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from core.merged_files import MergeOutcome, MergeRequest
from orchestrator.scheduling.node_choice import CONTROL_SHARE, NodeView, host_placement
from orchestrator.settings import Settings


class RayMerges:
    """Needs a connected Ray (`orchestrator.scheduling.ray_connection.RayConnection`)."""

    def __init__(self, settings: Settings, nodes: Callable[[], list[NodeView]]) -> None:
        self.control_resource = settings.control_resource
        self.nodes = nodes  # the cluster's nodes (RayHosts.nodes)
        self._tasks: dict[str, tuple[Any, MergeRequest]] = {}  # merge id -> (ref, request)
        self._remote: Any = None  # the task, made on first use (it imports torch)

    def start(self, request: MergeRequest) -> None:
        placement = host_placement(self.nodes(), self.control_resource)
        options: dict[str, Any] = {}
        if placement.resource:
            options["resources"] = {placement.resource: CONTROL_SHARE}
        elif placement.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                placement.node_id, soft=False
            )
        if self._remote is None:
            from workers.runtime.merge_task import merge_to_store

            self._remote = ray.remote(num_cpus=0, max_retries=0)(merge_to_store)
        ref = self._remote.options(**options).remote(request)
        self._tasks[request.merge_id] = (ref, request)

    def running(self) -> set[str]:
        return set(self._tasks)

    def finished(self) -> list[MergeOutcome]:
        """The merges that ended since the last call (never waits)."""
        refs = {ref: merge_id for merge_id, (ref, _) in self._tasks.items()}
        if not refs:
            return []
        try:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        except Exception as exc:  # Ray itself restarted beneath them: they are gone
            lost, self._tasks = self._tasks, {}
            return [
                MergeOutcome(merge_id, request.job_id, error=f"lost with Ray: {exc}")
                for merge_id, (_, request) in sorted(lost.items())
            ]
        outcomes = []
        for ref in ready:
            merge_id = refs[ref]
            _, request = self._tasks.pop(merge_id)
            try:
                outcomes.append(ray.get(ref))
            except Exception as exc:  # the task's process died (its node lost, say)
                outcomes.append(MergeOutcome(merge_id, request.job_id, error=f"{exc}"))
        return outcomes
