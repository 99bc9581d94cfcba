"""Reservations (pure): a queued job whose host the cluster cannot place holds, after
`reserve_after_seconds`, the resources it waits for, so smaller jobs stop overtaking it.

A reserved job goes first in admission's order; the free resources that fit part of its
host are kept for it (other hosts start only in what is left beside them); and the fewest
hosts of other shapes whose workers would cover the rest take no new job (fewest jobs
first: they drain soonest; an idle one ends at once; a warm one is never drained). So it
starts once the jobs already on those hosts end, however many small jobs keep arriving.

The freed workers are assumed reusable wherever they are: exact on one node, and on
several for bundles of one CPU (and one GPU) each, as hosts ask for them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator.scheduling.placement import Resources, place


@dataclass(frozen=True)
class HostHolding:
    """A live host: what ending it would free."""

    host_id: str
    shape: str  # HostShape.key
    bundles: list[Resources]
    jobs: int
    warm: bool = False
    ending: bool = False  # frees its workers soon anyway


@dataclass
class Reservations:
    """Which queued jobs wait for a host that cannot be placed, since when, and which of
    them hold a reservation. In memory: a restarted scheduler counts afresh."""

    reserve_after_seconds: float
    waiting_since: dict[str, float] = field(default_factory=dict)  # job -> first unplaced
    reserved_at: dict[str, float] = field(default_factory=dict)  # job -> when it reserved

    def unplaced(self, job_ids: Iterable[str], now: float) -> list[str]:
        """Jobs whose host could not be placed this tick; returns those that reserve now
        (each once: the caller records the event)."""
        newly = []
        for job_id in job_ids:
            since = self.waiting_since.setdefault(job_id, now)
            if job_id not in self.reserved_at and now - since >= self.reserve_after_seconds:
                self.reserved_at[job_id] = now
                newly.append(job_id)
        return newly

    def keep(self, queued: Collection[str]) -> None:
        """Forgets jobs that left the queue (started, cancelled, failed)."""
        for book in (self.waiting_since, self.reserved_at):
            for job_id in [j for j in book if j not in queued]:
                del book[job_id]

    def age(self, job_id: str, now: float) -> float | None:
        """Seconds since the job reserved; None if it holds no reservation."""
        at = self.reserved_at.get(job_id)
        return None if at is None else now - at


def held_beside(
    reserved: Sequence[Sequence[Resources]], free: Sequence[Resources]
) -> list[Resources]:
    """The free resources left for others once each reserved host (its bundles, in order)
    takes whatever of it fits now."""
    left = [dict(node) for node in free]
    for bundles in reserved:
        for bundle in bundles:
            taken = place([bundle], left)
            if taken is not None:
                left = taken
    return left


def place_beside(
    bundles: Sequence[Resources],
    free: Sequence[Resources],
    reserved: Sequence[Sequence[Resources]],
) -> list[Resources] | None:
    """`free` less `bundles` if they fit beside what the reservations hold, else None."""
    if place(bundles, held_beside(reserved, free)) is None:
        return None
    return place(bundles, free)


def hosts_to_drain(
    need: Sequence[Resources],
    free: Sequence[Resources],
    others: Sequence[HostHolding],
    starts_left: int,
) -> list[str]:
    """The fewest hosts of other shapes (fewest jobs first) whose ending frees what `need`
    lacks in `free`, a start under `max_concurrent_runs` included; none if it fits now.
    When even all of them would not do, all of them (warm hosts excepted)."""
    pool = [dict(node) for node in free]
    chosen: list[str] = []
    for host in sorted((h for h in others if not h.warm), key=lambda h: (h.jobs, h.host_id)):
        if starts_left > 0 and place(need, pool) is not None:
            break
        chosen.append(host.host_id)
        pool.extend(dict(bundle) for bundle in host.bundles)
        starts_left += 1
    return chosen


def hosts_to_close(
    reserved: dict[str, list[Resources]],
    free: Sequence[Resources],
    hosts: Sequence[HostHolding],
    starts_left: int,
) -> set[str]:
    """The hosts that take no new job so the reserved hosts (shape -> bundles) can start:
    for each, `hosts_to_drain` among the hosts of other shapes, counting what hosts
    already ending will free."""
    ending = [h for h in hosts if h.ending]
    pool = [*(dict(n) for n in free), *(dict(b) for h in ending for b in h.bundles)]
    closed: set[str] = set()
    for shape, need in reserved.items():
        others = [h for h in hosts if h.shape != shape and not h.ending]
        closed.update(hosts_to_drain(need, pool, others, starts_left + len(ending)))
    return closed
