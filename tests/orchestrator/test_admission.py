"""Admission (pure): hot hosts first, then a new host, else wait; priority, then tenant fairness."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from core.memory_estimate import SlotDemand
from orchestrator.scheduling.admission import HostRoom, WaitingJob, fair_order, plan_admissions

SHAPE = "tiny/2xcpu/fp32"
OTHER = "small/2xcpu/fp32"


def job(
    job_id: str, tenant: str = "t1", at: float = 0, priority: int = 0, **kw: object
) -> WaitingJob:
    return WaitingJob(job_id, tenant, str(kw.get("shape", SHAPE)), at, priority)


def slots_fit(limit: int):  # type: ignore[no-untyped-def]
    """A memory model where each job weighs its rows: `limit` rows fit on one host."""

    def fits(shape: str, demands: Sequence[SlotDemand]) -> bool:
        return sum(d.rows_per_rank for d in demands) <= limit

    return fits


def plan(waiting, hosts=(), *, running=None, starts=0, max_slots=4, fits=None):  # type: ignore[no-untyped-def]
    ids = (f"new-{i}" for i in itertools.count())
    return plan_admissions(
        waiting,
        list(hosts),
        running_per_tenant=running or {},
        free_host_starts=starts,
        max_slots=max_slots,
        fits=fits or slots_fit(100),
        new_host_id=lambda: next(ids),
    )


def test_a_job_joins_a_hot_host_of_its_shape_with_room() -> None:
    hosts = [HostRoom("other", OTHER, 4), HostRoom("hot", SHAPE, 4, [SlotDemand(1, 8, 8)])]
    result = plan([job("a")], hosts, starts=1)
    assert [(j.job_id, j.host_id) for j in result.joins] == [("a", "hot")]
    assert result.starts == []


def test_the_busiest_host_with_room_is_preferred_so_idle_ones_can_end() -> None:
    busy = HostRoom("busy", SHAPE, 4, [SlotDemand(1, 8, 8)] * 2)
    idle = HostRoom("idle", SHAPE, 4)
    result = plan([job("a")], [idle, busy])
    assert result.joins[0].host_id == "busy"


def test_an_idle_host_counts_as_capacity() -> None:
    result = plan([job("a")], [HostRoom("idle", SHAPE, 4, warm=True)], starts=0)
    assert [j.host_id for j in result.joins] == ["idle"]


def test_a_full_host_means_a_new_host_when_the_cluster_has_room() -> None:
    full = HostRoom("full", SHAPE, 2, [SlotDemand(1, 8, 8)] * 2)
    result = plan([job("a"), job("b", at=1)], [full], starts=1, max_slots=4)
    assert [s.host_id for s in result.starts] == ["new-0"]
    # The second job joins the host the first one started, in the same plan.
    assert [(j.job_id, j.host_id) for j in result.joins] == [("a", "new-0"), ("b", "new-0")]


def test_no_room_anywhere_means_wait() -> None:
    full = HostRoom("full", SHAPE, 1, [SlotDemand(1, 8, 8)])
    result = plan([job("a")], [full], starts=0)
    assert result.joins == [] and result.starts == [] and result.waiting == ["a"]


def test_an_ending_host_takes_no_job() -> None:
    result = plan([job("a")], [HostRoom("ending", SHAPE, 4, ending=True)], starts=0)
    assert result.waiting == ["a"]


def test_jobs_join_until_the_memory_estimate_says_full_and_the_next_waits() -> None:
    host = HostRoom("h", SHAPE, 8)
    waiting = [job(f"j{i}", at=i) for i in range(5)]
    result = plan(waiting, [host], fits=slots_fit(3), starts=0)
    assert [j.job_id for j in result.joins] == ["j0", "j1", "j2"]
    assert result.waiting == ["j3", "j4"]


def test_a_waiting_job_is_not_overtaken_by_a_smaller_one_of_its_shape() -> None:
    host = HostRoom("h", SHAPE, 8, [SlotDemand(2, 8, 8)])
    big = WaitingJob("big", "t1", SHAPE, 0, demand=SlotDemand(2, 8, 8))
    small = WaitingJob("small", "t2", SHAPE, 1, demand=SlotDemand(1, 8, 8))
    other = WaitingJob("other", "t3", OTHER, 2, demand=SlotDemand(1, 8, 8))
    result = plan([big, small, other], [host, HostRoom("o", OTHER, 8)], fits=slots_fit(3))
    assert result.waiting == ["big", "small"]
    assert [j.job_id for j in result.joins] == ["other"]  # another shape is not held up


def test_a_job_too_big_for_an_empty_host_is_reported_not_kept_waiting() -> None:
    big = WaitingJob("big", "t1", SHAPE, 0, demand=SlotDemand(9, 8, 8))
    result = plan([big, job("a", at=1)], starts=1, fits=slots_fit(4))
    assert result.never_fit == ["big"]
    assert [j.job_id for j in result.joins] == ["a"]


def test_slot_limit_is_respected() -> None:
    result = plan([job(f"j{i}", at=i) for i in range(3)], [HostRoom("h", SHAPE, 2)])
    assert [j.job_id for j in result.joins] == ["j0", "j1"]
    assert result.waiting == ["j2"]


def test_an_idle_host_of_another_shape_is_retired_for_a_waiting_job_but_never_a_warm_one() -> None:
    idle = HostRoom("idle", OTHER, 4)
    result = plan([job("a")], [idle], starts=0)
    assert result.retire == ["idle"] and result.waiting == ["a"]
    warm = HostRoom("warm", OTHER, 4, warm=True)
    assert plan([job("a")], [warm], starts=0).retire == []
    busy = HostRoom("busy", OTHER, 4, [SlotDemand(1, 8, 8)])
    assert plan([job("a")], [busy], starts=0).retire == []


def test_higher_priority_goes_first() -> None:
    waiting = [job("old-low", at=0), job("new-high", at=5, priority=10)]
    assert [j.job_id for j in fair_order(waiting, {})] == ["new-high", "old-low"]
    result = plan(waiting, [HostRoom("h", SHAPE, 1)])
    assert [j.job_id for j in result.joins] == ["new-high"]


def test_one_tenants_hundred_jobs_do_not_starve_another_tenants_one() -> None:
    flood = [job(f"a{i}", "alice", at=i) for i in range(100)]
    late = job("b0", "bob", at=500)
    order = [j.job_id for j in fair_order([*flood, late], {})]
    assert order.index("b0") <= 1
    result = plan([*flood, late], [HostRoom("h", SHAPE, 2)])
    assert {j.job_id for j in result.joins} == {"a0", "b0"}


def test_the_tenant_with_fewer_running_jobs_goes_next_then_age() -> None:
    waiting = [job("a0", "alice", at=0), job("a1", "alice", at=1), job("b0", "bob", at=2)]
    order = [j.job_id for j in fair_order(waiting, {"alice": 3, "bob": 0})]
    assert order == ["b0", "a0", "a1"]
    # Equal running counts: round-robin, the tenant whose head job is oldest first.
    waiting = [job(f"a{i}", "alice", at=i) for i in range(3)] + [
        job(f"b{i}", "bob", at=10 + i) for i in range(2)
    ]
    assert [j.job_id for j in fair_order(waiting, {})] == ["a0", "b0", "a1", "b1", "a2"]


def test_the_plan_does_not_change_the_hosts_it_was_given() -> None:
    host = HostRoom("h", SHAPE, 4)
    plan([job("a")], [host])
    assert host.demands == []


def test_with_nobody_running_the_tenant_that_started_longest_ago_goes_next() -> None:
    waiting = [job("a1", "alice", at=1), job("a2", "alice", at=2), job("b0", "bob", at=5)]
    order = fair_order(waiting, {}, last_started={"alice": 100.0})
    assert [j.job_id for j in order] == ["b0", "a1", "a2"]
    order = fair_order(waiting, {}, last_started={"alice": 100.0, "bob": 200.0})
    assert [j.job_id for j in order] == ["a1", "b0", "a2"]


def test_an_unpacked_job_starts_a_host_of_one_slot_that_no_one_joins() -> None:
    alone = WaitingJob("alone", "t1", SHAPE, 0, exclusive=True)
    result = plan(
        [alone, job("b", at=1)], [HostRoom("hot", SHAPE, 4, [SlotDemand(1, 8, 8)])], starts=2
    )
    assert [(s.host_id, s.exclusive) for s in result.starts] == [("new-0", True)]
    assert {(j.job_id, j.host_id) for j in result.joins} == {("alone", "new-0"), ("b", "hot")}
    # With no start left, it waits, and the jobs behind it that can join a host still do;
    # an idle host, even of its own shape, is ended to make it room.
    idle = HostRoom("idle", SHAPE, 4)
    result = plan([alone, job("b", at=1)], [idle], starts=0)
    assert result.waiting == ["alone"] and [j.host_id for j in result.joins] == ["idle"]
    assert result.retire == []  # b is on it now
    result = plan([alone], [HostRoom("idle", SHAPE, 4)], starts=0)
    assert result.retire == ["idle"]
