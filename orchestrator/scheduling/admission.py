"""Which queued job goes to which pack host (pure): join a hot host, start one, or wait.

The order among waiting jobs: a job holding a reservation (orchestrator.scheduling.reservation)
first; then fair across tenants: the tenant with the fewest jobs running (counting those
placed in this plan) goes next, ties to the tenant whose last job started longest ago, then
to the tenant with the oldest job. `priority` orders a tenant's own jobs only (higher first,
then the oldest), never one tenant's ahead of another's: so one tenant's 100 queued jobs, at
whatever priority it may use, do not starve another tenant's one.

Then, in that order, a job goes to a host of its shape (base model and run shape) with a
free slot whose memory estimate (its jobs and its Tinker models) still fits with the job
added, preferring the busiest such host (idle hosts stay free to end); else a new host of
its shape if the cluster has room for one; else it waits. A job that waits holds its
shape's line: later jobs of the same shape do not overtake it (a small job slipping into
the last bytes of a host would starve a big one). A host with no jobs counts as capacity
for its shape; an idle host that is not warm may be retired to make room for a job of
another shape.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace

from core.memory_estimate import SlotDemand

# Whether these slots fit together on one host of that shape (the memory estimate).
Fits = Callable[[str, Sequence[SlotDemand]], bool]


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    tenant: str
    shape: str  # HostShape.key
    created_at: float
    priority: int = 0
    demand: SlotDemand = field(default_factory=lambda: SlotDemand(1, 1, 1))
    # `packing: false`: trains on a host of its own that nobody else joins.
    exclusive: bool = False
    reserved: bool = False  # waited past `reserve_after_seconds` for its host: goes first


@dataclass
class HostRoom:
    """What admission knows of a live host (from its last poll)."""

    host_id: str
    shape: str
    max_slots: int
    demands: list[SlotDemand] = field(default_factory=list)  # its jobs' demands
    ending: bool = False
    warm: bool = False
    # Its Tinker models (core.tinker_memory): counted in its memory as its jobs are, but
    # taking none of its `max_slots` (those are jobs').
    tinker: list[SlotDemand] = field(default_factory=list)

    @property
    def slots_in_use(self) -> int:
        return len(self.demands)


@dataclass(frozen=True)
class Join:
    job_id: str
    host_id: str


@dataclass(frozen=True)
class StartHost:
    host_id: str
    shape: str
    exclusive: bool = False  # a host of one slot for one `packing: false` job


@dataclass
class AdmissionPlan:
    starts: list[StartHost] = field(default_factory=list)  # start these first, in order
    joins: list[Join] = field(default_factory=list)  # then admit these, in order
    retire: list[str] = field(default_factory=list)  # idle hosts to end (room for others)
    never_fit: list[str] = field(default_factory=list)  # too big even for an empty host
    # Jobs that wanted a new host and got none (the first of each shape left without one).
    unhosted: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


def max_priority(limits: dict[str, int], tenant: str) -> int:
    """The highest `priority` a tenant may ask for: its own entry in the operator's
    `tenant_max_priority`, else the "*" entry, else 0 (priority orders a tenant's own jobs
    only, so the limit keeps a tenant's use of it deliberate, not a queue jump)."""
    return limits.get(tenant, limits.get("*", 0))


def fair_order(
    waiting: Iterable[WaitingJob],
    running: dict[str, int],
    last_started: dict[str, float] | None = None,
) -> list[WaitingJob]:
    """Reserved jobs first (oldest first); then round-robin across tenants: fewest running
    first, then the tenant whose last job started longest ago (never: first), then the
    oldest head job. Each tenant's queue is in its own order: `priority` (higher first),
    then age. With one slot nobody has a job running when it frees, so the last start is
    what turns the tenants in round-robin."""
    since = last_started or {}
    jobs = list(waiting)
    order = sorted((j for j in jobs if j.reserved), key=lambda j: (j.created_at, j.job_id))
    counts = dict(running)
    for job in order:
        counts[job.tenant] = counts.get(job.tenant, 0) + 1
    queues: dict[str, list[WaitingJob]] = defaultdict(list)  # each popped from its end
    for job in sorted(
        (j for j in jobs if not j.reserved),
        key=lambda j: (-j.priority, j.created_at, j.job_id),
        reverse=True,
    ):
        queues[job.tenant].append(job)
    heap = [
        (counts.get(t, 0), since.get(t, float("-inf")), q[-1].created_at, q[-1].job_id, t)
        for t, q in queues.items()
    ]
    heapq.heapify(heap)
    while heap:
        *_, tenant = heapq.heappop(heap)
        order.append(queues[tenant].pop())
        counts[tenant] = counts.get(tenant, 0) + 1
        if queues[tenant]:
            head = queues[tenant][-1]
            last = float("inf")  # just now, in this plan
            heapq.heappush(heap, (counts[tenant], last, head.created_at, head.job_id, tenant))
    return order


def plan_admissions(
    waiting: Iterable[WaitingJob],
    hosts: Sequence[HostRoom],
    *,
    running_per_tenant: dict[str, int],
    last_started: dict[str, float] | None = None,
    free_host_starts: int,
    max_slots: int,
    fits: Fits,
    new_host_id: Callable[[], str],
    closed: Collection[str] = (),
) -> AdmissionPlan:
    """Places waiting jobs on hosts (see the module's docstring). `free_host_starts`: how
    many more hosts the cluster has resources for now. `closed`: hosts draining for a
    reservation: they take no job, and end once idle."""
    plan = AdmissionPlan()
    rooms = [
        replace(h, demands=list(h.demands))
        for h in hosts
        if not h.ending and h.host_id not in closed
    ]
    # (shape, exclusive) of the first waiting job that could not be placed: an exclusive
    # job waits for a host of its own, which packable jobs joining a host do not take.
    blocked: set[tuple[str, bool]] = set()
    for job in fair_order(waiting, running_per_tenant, last_started):
        if (job.shape, job.exclusive) in blocked:
            plan.waiting.append(job.job_id)
            continue
        if not fits(job.shape, [job.demand]):
            plan.never_fit.append(job.job_id)
            continue
        candidates = [
            h
            for h in rooms
            if h.shape == job.shape
            and not job.exclusive
            and h.slots_in_use < h.max_slots
            and fits(job.shape, [*h.demands, *h.tinker, job.demand])
        ]
        if candidates:
            host = max(candidates, key=lambda h: (h.slots_in_use, h.host_id))
        elif free_host_starts > 0:
            free_host_starts -= 1
            # An exclusive job's host is full with it, and ends when it leaves.
            slots = 1 if job.exclusive else max_slots
            host = HostRoom(new_host_id(), job.shape, slots)
            rooms.append(host)
            plan.starts.append(StartHost(host.host_id, job.shape, job.exclusive))
        else:
            blocked.add((job.shape, job.exclusive))
            plan.unhosted.append(job.job_id)
            plan.waiting.append(job.job_id)
            continue
        host.demands.append(job.demand)
        plan.joins.append(Join(job.job_id, host.host_id))
    # An idle host of another shape (of any shape, for an exclusive job) holds resources a
    # blocked job could use: end one per blocked shape (its workers are free by a later
    # tick). A warm host is never retired.
    idle = sorted(
        (h for h in rooms if not h.demands and not h.warm), key=lambda h: h.host_id, reverse=True
    )
    for shape, exclusive in sorted(blocked):
        other = [h for h in idle if exclusive or h.shape != shape]
        if other:
            plan.retire.append(other[-1].host_id)
            idle.remove(other[-1])
    plan.retire += sorted(
        h.host_id
        for h in hosts
        if h.host_id in closed and not h.demands and not h.ending and not h.warm
    )
    return plan
