"""Watching pack hosts, the first half of the scheduler's tick: one poll per host (all its
jobs' states and new events in one call, every host at once), each job's events stored, the
jobs that ended finished, and the watchdog: a job past its `max_runtime` fails with
`timeout`; a host with jobs and no step for `step_timeout_seconds` is ended and its jobs
requeue, to resume from their checkpoints on another host; a host that does not answer its
poll costs only its own jobs (`_silent_host`): the tick goes on without it. Also what both
halves share: the scheduling's logger, a job's log context, what a host's report says of it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from core.host_protocol import SETUP_PHASES, HostReport, NodeRef, PackHosts, Unanswered
from core.run_states import RunJobState
from orchestrator.errors import NotFound
from orchestrator.metrics import RUN_POLL_TIMEOUTS, Capacity, observe_training
from orchestrator.scheduling.drain import hosts_to_drain
from orchestrator.scheduling.finish_estimate import FinishEstimates
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE_RUN_STATUSES, JobStatus
from orchestrator.store import JobStore
from orchestrator.tables import JobRow

# The scheduling's one logger: a tick's lines name one module, whichever half wrote them.
log = logging.getLogger("orchestrator.scheduling.host_scheduling")

HOST_ID_PREFIX = "host-"  # new_id("host"): a job's run_id is its host's id


class HostWatch:
    """The watch half of `orchestrator.scheduling.host_scheduling.HostScheduling`, which
    sets these attributes."""

    settings: Settings
    store: JobStore
    hosts: PackHosts
    clock: Callable[[], float]
    outcomes: JobOutcomes
    reports: dict[str, HostReport]  # this tick's poll of every host that answered
    unanswered: set[str]  # hosts that did not answer this tick's poll
    _missed_polls: dict[str, int]
    _first_seen: dict[str, float]
    _admitted_at: dict[str, float]
    _host_nodes: dict[str, NodeRef]  # host -> its node, as its last report had it
    finish_estimates: FinishEstimates

    def watch(self) -> None:
        """Polls every host at once (each job's events from its cursor), then per host: a
        silent one waits or is ended, a lost one's jobs requeue, a hung one is ended, and
        each job of an answering one is stored and finished if it ended."""
        # Every running job, whatever its run id: one left by an older lorafleet in a run
        # of its own (`run-…`, before hosts were the only path) is on no host: it requeues.
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        by_host: dict[str, list[JobRow]] = defaultdict(list)
        for job in active:
            by_host[job.run_id or ""].append(job)
        alive = set(self.hosts.list_hosts())
        answers = self.hosts.poll_all(
            {h: {j.id: j.event_cursor for j in by_host.get(h, [])} for h in sorted(alive)}
        )
        self.reports, self.unanswered = {}, set()
        for host_id in sorted(alive | set(by_host)):
            jobs = by_host.get(host_id, [])
            report = answers.get(host_id)
            if isinstance(report, Unanswered):
                self.unanswered.add(host_id)
                self._silent_host(host_id, report, jobs)
                continue
            self._missed_polls.pop(host_id, None)  # answered: a next stall counts afresh
            if report is None:
                self._host_gone(host_id, jobs)
                continue
            self._first_seen.setdefault(host_id, self.clock())
            if "node" in report:
                self._host_nodes[host_id] = report["node"]
            if self._hung(host_id, report):
                self._restart_hung(host_id, jobs)
                continue
            self.reports[host_id] = report
            for job in jobs:
                self._watch_job(host_id, job, report)
            self._tidy(host_id, report, {j.id for j in jobs})
        for gone in set(self._host_nodes) - alive - set(by_host):
            del self._host_nodes[gone]  # neither up nor holding a job: nothing to say of it
        self._drain_hosts()
        self.hosts.reap()

    def _drain_hosts(self) -> None:
        """Hosts with a rank on a node being drained (Ray's drain, or the operator's through
        `lorafleet hosts drain`) are drained: their jobs are handed back at the next step
        boundary and continue elsewhere (orchestrator.scheduling.drain)."""
        try:
            draining = self.hosts.draining_nodes()
        except Exception:  # the cluster's state unreadable now: asked again next tick
            log.debug("draining nodes unknown this tick", exc_info=True)
            return
        if not draining:
            return
        for host_id, why in hosts_to_drain(list(self.reports.values()), draining).items():
            log.info("%s: draining pack host %s", why, host_id, extra={"host_id": host_id})
            self.hosts.drain(host_id, why)

    def _silent_host(self, host_id: str, unanswered: Unanswered, jobs: list[JobRow]) -> None:
        """A host that did not answer its poll: its jobs stay running (it may only be slow),
        each gets one warning event per stall, and once it has been silent for
        `max_run_poll_timeouts` poll timeouts in a row it is ended and its jobs requeue.
        Nothing else waits for it: the tick goes on with the other hosts."""
        timeout = self.settings.run_poll_timeout_seconds
        limit = self.settings.max_run_poll_timeouts
        missed = max(1, int((self.clock() - unanswered.since) / timeout))
        counted = self._missed_polls.get(host_id, 0)
        RUN_POLL_TIMEOUTS.inc(max(0, missed - counted))
        self._missed_polls[host_id] = max(missed, counted)
        if not counted:
            log.warning(
                "pack host %s did not answer a poll within %g s",
                host_id,
                timeout,
                extra={"host_id": host_id, "run_id": host_id},
            )
            for job in jobs:
                self.outcomes.guarded(
                    self.store.warn,
                    job.id,
                    job.attempt,
                    f"Pack host {host_id} did not answer within {timeout:g} s; waiting for "
                    f"it (its jobs are requeued after {limit} missed polls in a row)",
                    {"host_id": host_id, "missed_polls": missed},
                )
        if missed < limit:
            return
        del self._missed_polls[host_id]
        log.warning(
            "pack host %s did not answer %d polls in a row; ending it",
            host_id,
            missed,
            extra={"host_id": host_id, "run_id": host_id},
        )
        self.hosts.kill(host_id)
        reason = f"its pack host {host_id} did not answer {missed} polls in a row"
        preempted = self._preempted(host_id) if jobs else None
        for job in jobs:
            self._requeue(job, reason, preempted)

    def _watch_job(self, host_id: str, job: JobRow, report: HostReport) -> None:
        polled = report["jobs"].get(job.id)
        if polled is None or polled["attempt"] != job.attempt:
            # Claimed by another scheduler that has not admitted it yet, or lost by the host.
            self._host_lost(job, f"its pack host {host_id} does not have it")
            return
        state = polled["state"]
        if job.status == JobStatus.CANCELLING.value and state is RunJobState.RUNNING:
            self.hosts.stop(host_id, job.id)
        elif job.status == JobStatus.PAUSING.value and state is RunJobState.RUNNING:
            self.hosts.hand_back(host_id, job.id, "Paused")  # asked each tick: idempotent
        events = [_event(e) for e in polled["events"]]
        tokens = [
            e["data"]["trained_tokens"]
            for e in events
            if e["type"] == "metrics" and "trained_tokens" in (e["data"] or {})
        ]
        # The host counts on from the job's stored preemptions (one budget for its life).
        preemptions = [e["data"]["preemption"] for e in events if "preemption" in (e["data"] or {})]
        stored = self.store.record_run_events(
            job.id,
            job.attempt,
            events,
            polled["cursor"],
            trained_tokens=(tokens or [None])[-1],
            preemptions=(preemptions or [None])[-1],
            estimated_finish=self.finish_estimates.update(job.id, events),
        )
        if not stored:
            return
        if state is not RunJobState.RUNNING:
            self.finish_estimates.forget(job.id)
        observe_training(job.created_at, events)  # counted once: a fenced-off batch is not
        if state is not RunJobState.RUNNING:
            if not self.outcomes.settle(job, state, polled["error"], polled["error_code"]):
                return  # the store is away: the host keeps the job for a later tick
        elif self._over_runtime(job):
            self.hosts.stop(host_id, job.id)
            limit = _max_runtime(job)
            self.outcomes.fail(
                job, "timeout", f"the job ran longer than its max_runtime ({limit} s)"
            )
            return
        if state is not RunJobState.RUNNING:
            self.hosts.release(host_id, job.id)

    def _tidy(self, host_id: str, report: HostReport, ours: set[str]) -> None:
        """Jobs on the host that no active job of this host's is: release the ended ones,
        stop the ones still training (their job moved on: timed out, requeued). A job is
        claimed before it is admitted, so one admitted by another scheduler since this
        tick read the jobs is in the database already (read again here)."""
        for job_id, polled in report["jobs"].items():
            if job_id in ours:
                continue
            if polled["state"] is not RunJobState.RUNNING:
                self.hosts.release(host_id, job_id)
                continue
            current = self._row(job_id)
            if current is not None and current.attempt > polled["attempt"]:
                self.hosts.fence(host_id, job_id, current.attempt)  # a stale attempt leaves
            elif current is None or current.run_id != host_id:
                self.hosts.stop(host_id, job_id)

    def _hosts_up(self) -> int:
        """Hosts up as of this tick's poll, a silent one included (it holds its workers)."""
        return len(self.reports) + len(self.unanswered)

    def capacity(self) -> Capacity:
        """Pack hosts by state and the slots they report in use, from this tick's poll."""
        hosts = Counter(("hosts", _host_state(r)) for r in self.reports.values())
        hosts.update(("hosts", "unresponsive") for _ in self.unanswered)
        return Capacity(dict(hosts), sum(r["slots_in_use"] for r in self.reports.values()))

    def _hung(self, host_id: str, report: HostReport) -> bool:
        # A job waiting for its publish (a store that is away) is owed no step.
        if not report["slots_in_use"] - report.get("publishing", 0):
            return False
        activity = max(
            report["last_step_at"] or 0.0,
            report["started_at"],
            self._first_seen.get(host_id, 0.0),
            self._admitted_at.get(host_id, 0.0),
        )
        timeout = self.settings.step_timeout_seconds
        if report["last_step_at"] is None:
            # Never stepped: still starting (worker group, base load and partitioning take
            # minutes for a large base or on a loaded machine), not hung yet.
            timeout = max(timeout, host_start_allowance(self.settings))
        return self.clock() - activity > timeout

    def _restart_hung(self, host_id: str, jobs: list[JobRow]) -> None:
        timeout = self.settings.step_timeout_seconds
        log.warning(
            "pack host %s made no step for %s s; ending it",
            host_id,
            timeout,
            extra={"host_id": host_id, "run_id": host_id},
        )
        self.hosts.kill(host_id)
        for job in jobs:
            self.outcomes.retry_or_fail(job, f"pack host {host_id} made no step for {timeout:g} s")

    def _over_runtime(self, job: JobRow) -> bool:
        left = runtime_left(job, self.clock())
        return left is not None and left < 0

    # ---- outcomes (orchestrator.scheduling.outcomes: each a guarded change) ----
    def _host_lost(self, job: JobRow, reason: str) -> None:
        if not self._in_grace(job):
            self.outcomes.retry_or_fail(job, reason)

    def _in_grace(self, job: JobRow) -> bool:
        """Claimed a moment ago: its admission may not be visible on its host yet."""
        return self.clock() - (job.started_at or 0) < self.settings.run_start_grace_seconds

    def _host_gone(self, host_id: str, jobs: list[JobRow]) -> None:
        """A host that no longer exists: its jobs requeue, spending a preemption rather than
        an attempt when the node it was last on died preempted (a control node lost to a
        spot notice, or drained with a deadline the host's hand-back did not meet)."""
        due = [job for job in jobs if not self._in_grace(job)]
        if not due:
            return
        reason = f"its pack host {host_id}{_where(self._host_nodes.get(host_id))} disappeared"
        preempted = self._preempted(host_id)
        for job in due:
            self._requeue(job, reason, preempted)

    def _requeue(self, job: JobRow, reason: str, preempted: str | None) -> None:
        """`preempted`: None, or the cluster's words for the preemption of the host's node."""
        if preempted is None:
            self.outcomes.retry_or_fail(job, reason)
        else:
            said = f": {preempted}" if preempted else ""
            self.outcomes.preempted(job, f"{reason}; its node was preempted{said}")

    def _preempted(self, host_id: str) -> str | None:
        """The cluster's words (maybe none) if the host's last node is dead preempted, else
        None (alive, lost otherwise, unknown: the jobs spend an attempt, as before)."""
        node = self._host_nodes.get(host_id)
        if node is None:
            return None
        try:
            return self.hosts.preempted_nodes([node["node_id"]]).get(node["node_id"])
        except Exception:  # noqa: BLE001 - the cluster unreadable: counted as a plain loss
            log.warning("whether node %s was preempted is unknown", node["ip"], exc_info=True)
            return None

    def _row(self, job_id: str) -> JobRow | None:
        """The job's row now; None only if there is none (a database error is raised: a
        job must not be stopped because its row could not be read)."""
        try:
            return self.store.job(job_id)
        except NotFound:
            return None


def _where(node: NodeRef | None) -> str:
    """`" on node 10.0.0.5 (ab12cd34)"`: the host's node as its last report had it (a control
    node lost takes its hosts with it, and the jobs' events say which), or nothing."""
    return f" on node {node['ip']} ({node['node_id'][:8]})" if node else ""


def _host_state(report: HostReport) -> str:
    if report["ending"] or not report["alive"]:
        return "ending"
    return "busy" if report["slots_in_use"] else "idle"


def _max_runtime(job: JobRow) -> float | None:
    return float(job.max_runtime) if job.max_runtime else None


def runtime_left(job: JobRow, now: float) -> float | None:
    """Seconds left of the job's `max_runtime` (None: no limit), counted from its first
    start across every attempt: a job requeued after a lost host does not start afresh."""
    limit = _max_runtime(job)
    if limit is None:
        return None
    first = job.first_started_at or job.started_at
    return limit if first is None else limit - (now - first)


def host_start_allowance(settings: Settings) -> float:
    """The watchdog's least wait for a host's first step: each setup phase of its workers
    may take `setup_timeout_seconds` (the host fails its jobs past that itself), and the
    worker group's own start one more."""
    return settings.setup_timeout_seconds * (len(SETUP_PHASES) + 1)


def job_log_context(
    job: JobRow, host_id: str | None = None, attempt: int | None = None
) -> dict[str, Any]:
    """`extra=` of a log call about a job on a pack host (a host id is the job's run id)."""
    host = host_id or job.run_id
    return {
        "job_id": job.id,
        "host_id": host,
        "run_id": host,
        "attempt": job.attempt if attempt is None else attempt,
        "tenant": job.tenant,
    }


def exclusive_host(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("exclusive", False))


def warm_host(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("warm", False))


def _event(event: Any) -> dict[str, Any]:
    level = "error" if event["type"] == "job_failed" else "info"
    return {
        "type": event["type"],
        "message": event["message"],
        "level": level,
        "data": event["data"],
    }
