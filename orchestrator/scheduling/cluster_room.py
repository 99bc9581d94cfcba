"""Room on the cluster for the pack hosts `launch()` starts (a part of
`orchestrator.scheduling.host_scheduling.HostScheduling`): a host is placed beside what
reservations hold for other shapes; a job whose host could not be placed for
`reserve_after_seconds` reserves it (orchestrator.scheduling.reservation), and hosts it needs
take no new job until it starts; shapes that fit on no node now are asked of the cluster's
autoscaler (orchestrator.scheduling.node_choice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from core.host_protocol import HostReport, HostShape, PackHosts
from orchestrator.scheduling.admission import WaitingJob
from orchestrator.scheduling.host_watch import job_log_context, log, warm_host
from orchestrator.scheduling.node_choice import autoscaler_request
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.scheduling.placement import Resources, bundles_of
from orchestrator.scheduling.reservation import (
    HostHolding,
    Reservations,
    hosts_to_close,
    place_beside,
)
from orchestrator.scheduling.sizing import HostSizing
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.tables import JobRow


class ClusterRoom:
    """The room half of `HostScheduling` (which sets these attributes)."""

    settings: Settings
    store: JobStore
    hosts: PackHosts
    clock: Callable[[], float]
    sizing: HostSizing
    outcomes: JobOutcomes
    reports: dict[str, HostReport]
    reservations: Reservations
    _holding: dict[str, list[Resources]]  # reserved shape -> its bundles
    _closed: set[str]  # hosts draining for a reservation
    _requested: list[Resources]  # what the autoscaler was last asked for
    _told_no_room: set[str]  # queued jobs told their host fits nowhere
    _unplaceable: set[str]  # shapes the cluster could not place a host of

    if TYPE_CHECKING:  # HostWatch's (a body here could shadow it)

        def _hosts_up(self) -> int: ...

    def _placed(self, shape: HostShape, free: list[Resources]) -> list[Resources] | None:
        """The free resources left once a host of `shape` is placed beside what
        reservations hold for other shapes; None (its jobs wait, logged once per shape
        while it lasts) if the cluster cannot place it now."""
        holding = [bundles for key, bundles in self._holding.items() if key != shape.key]
        left = place_beside(bundles_of(shape), free, holding)
        if left is None and shape.key not in self._unplaceable:
            log.info("no free resources for a %s pack host now; its jobs wait", shape.key)
        (self._unplaceable.add if left is None else self._unplaceable.discard)(shape.key)
        return left

    # ---- room the cluster lacks: ask its autoscaler (orchestrator.scheduling.node_choice) ----
    def _ask_for_room(
        self,
        no_room: set[str],
        shapes: dict[str, HostShape],
        waiting: list[JobRow],
        started: list[HostShape],
    ) -> None:
        """Shapes that fit on no node now: the autoscaler is asked for them (with the hosts
        up and those `started` this tick, since Ray's request is for the whole cluster), once
        per change; each of their `waiting` jobs is told once. With none left the request is
        withdrawn."""
        running = [bundles_of(r["shape"]) for r in self.reports.values() if r["alive"]]
        running += [bundles_of(shape) for shape in started]
        request = autoscaler_request(running, [bundles_of(shapes[k]) for k in sorted(no_room)])
        if request != self._requested:
            try:
                self.hosts.request_resources(request)
                self._requested = request
            except Exception:  # no autoscaler to ask is not the tick's failure
                log.exception("asking the autoscaler for %s failed", request)
        self._told_no_room &= {job.id for job in waiting}
        for job in waiting:
            shape = self.sizing.shape_of(job)
            if shape.key not in no_room or job.id in self._told_no_room:
                continue
            self._told_no_room.add(job.id)
            bundles = bundles_of(shape)
            self.outcomes.guarded(
                self.store.warn,
                job.id,
                job.attempt,
                f"No node has free resources for a {shape.key} pack host "
                f"({len(bundles)} × {bundles[0]}); asked the cluster's autoscaler for them: the "
                "job starts when a node has room",
                {"requested_bundles": bundles, "shape": shape.key},
            )

    # ---- reservations (orchestrator.scheduling.reservation) ----
    def _hold_for_reservations(
        self, waiting: list[WaitingJob], shapes: dict[str, HostShape], free: list[Resources]
    ) -> set[str]:
        """What this tick's reservations hold (kept in `_holding` for `_placed`), and the
        hosts that take no new job so they can start: returns those hosts."""
        oldest_first = sorted((w for w in waiting if w.reserved), key=lambda w: w.created_at)
        self._holding = {w.shape: bundles_of(shapes[w.shape]) for w in oldest_first}
        holdings = [
            HostHolding(
                host_id,
                report["shape"].key,
                bundles_of(report["shape"]),
                report["slots_in_use"],
                warm=warm_host(report),
                ending=report["ending"],
            )
            for host_id, report in self.reports.items()
            if report["alive"]  # an ended one's workers are free already
        ]
        starts_left = self.settings.max_concurrent_runs - self._hosts_up()
        closed = hosts_to_close(self._holding, free, holdings, starts_left)
        for host_id in sorted(closed - self._closed):
            log.info(
                "pack host %s takes no new job: it drains for a reserved job",
                host_id,
                extra={"host_id": host_id, "run_id": host_id},
            )
        self._closed = closed
        return closed

    def _reserve(self, unplaced: list[str], by_id: dict[str, JobRow]) -> None:
        """Jobs whose host could not be placed this tick; one that has waited
        `reserve_after_seconds` reserves what it waits for (one event when it does)."""
        now = self.clock()
        for job_id in self.reservations.unplaced(unplaced, now):
            job = by_id[job_id]
            waited = now - self.reservations.waiting_since[job_id]
            shape = self.sizing.shape_of(job).key
            log.info("job %s reserves a %s pack host", job.id, shape, extra=job_log_context(job))
            self.outcomes.guarded(
                self.store.warn,
                job.id,
                job.attempt,
                f"Waited {waited:.0f} s for the resources of a {shape} pack host; they are "
                "reserved for this job now: smaller jobs no longer start hosts in them, and "
                "hosts it needs take no new job until it starts",
                {"reserved_for": shape, "waited_seconds": round(waited, 1), "reserved_at": now},
            )
