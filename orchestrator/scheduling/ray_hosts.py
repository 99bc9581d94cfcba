"""Pack hosts on Ray, as the scheduler sees them (`core.host_protocol.PackHosts`).

Each host is a detached, named actor `lorafleet-host-{host_id}` (`workers.host.pack_host`):
nothing is kept here that a restarted scheduler would need, so it adopts every host by
listing the names. Every call on a host is bounded by `run_poll_timeout_seconds`, and the
calls of one tick go to all hosts at once: a host that does not answer (a stalled node, a
stopped process) costs a tick that timeout at most once per stall, never an exception.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection
from typing import Any, cast

import ray

from core.host_protocol import (
    HOST_PREFIX,
    NO_ANSWER,
    AdmissionRequest,
    AdmissionResult,
    HostReport,
    HostSpec,
    NodeRef,
    Unanswered,
    host_actor_name,
)
from core.run_states import STOP_ALL
from orchestrator.scheduling.node_choice import (
    CONTROL_SHARE,
    NodeView,
    free_per_node,
    host_placement,
)
from orchestrator.settings import Settings
from workers.host.node_loss import lost_nodes
from workers.runtime.placement_groups import release_orphaned_placement_groups

START_TIMEOUT_S = 60
# A host answers a news wait at most this late (a long poll, workers.host.pack_host):
# bounded, so a host that went away is not waited on for long.
NEWS_WAIT_S = 10.0

Outstanding = dict[str, tuple[Any, float]]  # host id -> (a call's reference, when sent)


class RayHosts:
    """Needs a connected Ray (`orchestrator.scheduling.ray_connection.RayConnection`)."""

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        # The configured namespace: two deployments on one Ray cluster never adopt each
        # other's hosts.
        self.namespace = settings.ray_namespace
        self.control_resource = settings.control_resource
        self.call_timeout = settings.run_poll_timeout_seconds
        # Calls sent and not answered yet. A host that does not answer is not asked again
        # until it does: a stopped one gathers no backlog of calls, and later ticks only
        # look whether the answer came.
        self._polls: Outstanding = {}
        self._finished: Outstanding = {}
        self._failing: dict[str, float] = {}  # host -> since when its polls fail
        # News waits (`wait_for_news`, on the scheduler's news thread only): the call out
        # to each host, and the news count each last said.
        self._news_calls: dict[str, Any] = {}
        self._news_seen: dict[str, int] = {}
        self._news_failed: dict[str, float] = {}  # host -> when its news wait last failed

    def _actor(self, host_id: str) -> Any | None:
        try:
            return ray.get_actor(host_actor_name(host_id), namespace=self.namespace)
        except ValueError:
            return None

    def list_hosts(self) -> list[str]:
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            entry["name"].removeprefix(HOST_PREFIX)
            for entry in names
            if entry["namespace"] == self.namespace and entry["name"].startswith(HOST_PREFIX)
        )

    def start_host(self, spec: HostSpec) -> None:
        from workers.host.pack_host import PackHost

        placement = host_placement(self.nodes(), self.control_resource)
        options: dict[str, Any] = {}
        if placement.resource:
            options["resources"] = {placement.resource: CONTROL_SHARE}
        elif placement.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # Not soft: a host on a worker node would lose all its jobs with that node.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                placement.node_id, soft=False
            )
        actor = PackHost.options(  # type: ignore[attr-defined]
            name=host_actor_name(spec.host_id),
            namespace=self.namespace,
            lifetime="detached",
            **options,
        ).remote(spec)
        ray.get(actor.start.remote(), timeout=START_TIMEOUT_S)

    def admit(self, host_id: str, request: AdmissionRequest) -> AdmissionResult:
        actor = self._actor(host_id)
        if actor is None:
            return AdmissionResult(False, "no such host")
        if host_id in self._polls:  # silent since its last poll: not asked, so not taken
            return AdmissionResult(False, "not answering")
        try:
            result: AdmissionResult = ray.get(
                actor.admit.remote(request), timeout=self.call_timeout
            )
        except ray.exceptions.RayActorError:
            return AdmissionResult(False, "host died")
        except ray.exceptions.GetTimeoutError:
            return AdmissionResult(False, NO_ANSWER)  # it may still run the call
        return result

    def release(self, host_id: str, job_id: str) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.release.remote(job_id)

    def poll(self, host_id: str, cursors: dict[str, int]) -> HostReport | None:
        """One host's poll, waited for (tools and tests; the scheduler uses `poll_all`)."""
        actor = self._actor(host_id)
        if actor is None:
            return None
        try:
            report: HostReport = ray.get(actor.poll.remote(cursors), timeout=self.call_timeout)
        except ray.exceptions.RayActorError:
            return None
        return report

    def poll_all(
        self, cursors: dict[str, dict[str, int]]
    ) -> dict[str, HostReport | Unanswered | None]:
        answers: dict[str, HostReport | Unanswered | None] = {}
        for book in (self._polls, self._failing):
            for host_id in set(book) - set(cursors):
                del book[host_id]  # no longer asked about: it is gone
        fresh = set()
        for host_id, host_cursors in cursors.items():
            if host_id in self._polls:
                continue
            actor = self._actor(host_id)
            if actor is None:
                answers[host_id] = None
            else:
                self._polls[host_id] = (actor.poll.remote(host_cursors), time.time())
                fresh.add(host_id)
        ready = self._answered(self._polls, fresh)
        for host_id, (ref, sent) in list(self._polls.items()):
            if ref not in ready:
                answers[host_id] = Unanswered(sent)
                continue
            del self._polls[host_id]
            try:
                report = cast(HostReport, ray.get(ref))
                answers[host_id] = report
                self._failing.pop(host_id, None)
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError):
                # Unreachable for now, or its poll raised: as good as silent (ended if it
                # stays so), counted from its first such answer.
                answers[host_id] = Unanswered(self._failing.setdefault(host_id, sent))
            except ray.exceptions.RayActorError:
                answers[host_id] = None  # dead
        return answers

    def _answered(self, calls: Outstanding, fresh: set[str]) -> set[Any]:
        """The references of `calls` that have their answer. Those sent this tick
        (`fresh`) are waited for together, at most the call timeout (a live host answers
        in milliseconds); those outstanding from an earlier tick are only looked at."""
        new = [ref for host_id, (ref, _) in calls.items() if host_id in fresh]
        old = [ref for host_id, (ref, _) in calls.items() if host_id not in fresh]
        ready: list[Any] = []
        if new:
            ready += ray.wait(new, num_returns=len(new), timeout=self.call_timeout)[0]
        if old:
            ready += ray.wait(old, num_returns=len(old), timeout=0)[0]
        return set(ready)

    def wait_for_news(self, timeout: float) -> bool:
        """One long poll out to each host at a time (`PackHost.wait_news`, answered as soon
        as its news count moves); waits up to `timeout` for any answer. A host's first
        answer is news too (what it did before this call looked is not known: a job
        claimed in the tick that connected may have stepped already), as is one that died."""
        hosts = self.list_hosts()
        for host_id in set(self._news_calls) - set(hosts):
            del self._news_calls[host_id]
        for book in (self._news_seen, self._news_failed):
            for host_id in set(book) - set(hosts):
                del book[host_id]
        for host_id in hosts:
            failed = self._news_failed.get(host_id)
            if host_id in self._news_calls or (failed and time.time() - failed < NEWS_WAIT_S):
                continue  # one that failed is asked again later, not in a tight loop
            actor = self._actor(host_id)
            if actor is not None and hasattr(actor, "wait_news"):  # an older host has none
                seen = self._news_seen.get(host_id, -1)
                self._news_calls[host_id] = actor.wait_news.remote(seen, NEWS_WAIT_S)
        if not self._news_calls:
            time.sleep(timeout)
            return False
        host_of = {ref: host_id for host_id, ref in self._news_calls.items()}
        ready, _ = ray.wait(list(host_of), num_returns=1, timeout=timeout)
        news = False
        for ref in ready:
            host_id = host_of[ref]
            del self._news_calls[host_id]
            try:
                count = int(ray.get(ref))
            except ray.exceptions.RayError:  # gone or failing: the tick's poll says which
                self._news_seen.pop(host_id, None)
                self._news_failed[host_id] = time.time()
                news = True
                continue
            news = news or self._news_seen.get(host_id) != count
            self._news_seen[host_id] = count
        return news

    def stop(self, host_id: str, job_id: str = STOP_ALL) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.stop.remote(job_id)

    def hand_back(self, host_id: str, job_id: str, why: str) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.hand_back.remote(job_id, why)

    def drain(self, host_id: str, why: str) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.drain.remote(why)

    def fence(self, host_id: str, job_id: str, attempt: int) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.fence.remote(job_id, attempt)

    def kill(self, host_id: str) -> None:
        self._polls.pop(host_id, None)
        self._finished.pop(host_id, None)
        self._failing.pop(host_id, None)
        actor = self._actor(host_id)
        if actor is not None:
            ray.kill(actor)

    def reap(self) -> list[str]:
        """Removes host actors whose workers have ended (idle, stopped or failed), then the
        placement groups of hosts that are gone (`workers.runtime.placement_groups`).
        Every host is asked at once; one that does not answer is looked at again next time
        (the watch ends it if it stays silent), and one silent to polls is not asked."""
        hosts = [h for h in self.list_hosts() if h not in self._polls]
        for host_id in set(self._finished) - set(hosts):
            del self._finished[host_id]
        fresh = set()
        for host_id in hosts:
            actor = None if host_id in self._finished else self._actor(host_id)
            if actor is not None:
                self._finished[host_id] = (actor.finished.remote(), time.time())
                fresh.add(host_id)
        ready = self._answered(self._finished, fresh)
        reaped = []
        for host_id, (ref, _) in list(self._finished.items()):
            if ref not in ready:
                continue
            del self._finished[host_id]
            finished: bool = True  # a dead host has ended
            with contextlib.suppress(ray.exceptions.RayActorError):
                finished = bool(ray.get(ref))
            if finished:
                self.kill(host_id)
                reaped.append(host_id)
        release_orphaned_placement_groups(self.namespace)
        return reaped

    def nodes(self) -> list[NodeView]:
        """Every node that is not dead, as the GCS's autoscaler state has it (Ray's public
        autoscaler SDK: per node, its status, resources and what of them is free; no
        dashboard needed)."""
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [
            NodeView(
                node_id=node.node_id or "",
                ip=node.ip_address,
                status=node.node_status or "",
                total=node.total_resources(),
                available=node.available_resources(),
            )
            for node in [*status.active_nodes, *status.idle_nodes]
        ]

    def free_resources(self) -> list[dict[str, float]]:
        # Per node (a host's bundles must each fit on one), draining nodes left out.
        return free_per_node(self.nodes())

    def draining_nodes(self) -> dict[str, str]:
        return {n.node_id: n.ip for n in self.nodes() if n.status == "DRAINING"}

    def preempted_nodes(self, node_ids: Collection[str]) -> dict[str, str]:
        # `ray.nodes()` lists dead nodes too, with why Ray ended them; the host's own
        # classification of a lost worker node (workers/host/node_loss.py) is the one rule.
        ranks = [NodeRef(node_id=node_id, ip="") for node_id in node_ids]
        return {n.node_id: n.said for n in lost_nodes(ranks, ray.nodes()) if n.preempted}

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Asks the autoscaler (if any) to grow the cluster until `bundles` fit; an empty
        list withdraws the request. Without an autoscaler it is a no-op."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
