"""Fair order and reservations: priority never crosses tenants, and a job whose host cannot be
placed reserves what it waits for after `reserve_after_seconds`, so a stream of smaller jobs
stops overtaking it. Pure functions first, then the scheduler on in-memory hosts."""

from __future__ import annotations

import itertools
from pathlib import Path

from core.memory_estimate import SlotDemand
from orchestrator.jobs import NewJob, resolve_settings
from orchestrator.scheduling.admission import HostRoom, Join, WaitingJob, plan_admissions
from orchestrator.scheduling.reservation import (
    HostHolding,
    Reservations,
    held_beside,
    hosts_to_drain,
    place_beside,
)
from orchestrator.states import JobStatus
from tests.conftest import job_row
from tests.orchestrator.test_host_scheduling import World, make_world

CPU = {"CPU": 1.0}
SHAPE = "tiny/1xcpu/fp32"


def fits_any(_shape: str, _demands: object) -> bool:
    return True


def test_a_tenants_highest_priority_does_not_delay_another_tenants_job_past_fair_share() -> None:
    # Alice floods 20 jobs at the highest priority she may use; Bob's one job comes later
    # at 0. Four slots, nobody running: Bob's job is in the first plan, with 2 of the 4.
    flood = [WaitingJob(f"a{i}", "alice", SHAPE, created_at=i, priority=10) for i in range(20)]
    bob = WaitingJob("b0", "bob", SHAPE, created_at=100, priority=0)
    ids = (f"host-{i}" for i in itertools.count())
    plan = plan_admissions(
        [*flood, bob],
        [HostRoom("host-x", SHAPE, max_slots=4)],
        running_per_tenant={},
        free_host_starts=0,
        max_slots=4,
        fits=fits_any,
        new_host_id=lambda: next(ids),
    )
    placed = [j.job_id for j in plan.joins]
    assert "b0" in placed and len(placed) == 4
    assert placed.index("b0") <= 1
    # With Alice already running 3, Bob's job goes before any more of hers.
    plan = plan_admissions(
        [*flood, bob],
        [HostRoom("host-x", SHAPE, max_slots=4, demands=[])],
        running_per_tenant={"alice": 3},
        free_host_starts=0,
        max_slots=4,
        fits=fits_any,
        new_host_id=lambda: next(ids),
    )
    assert plan.joins[0].job_id == "b0"


def test_on_one_slot_the_tenants_take_turns_whatever_the_priority(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_concurrent_runs=1, max_slots_per_host=1)
    flood = [world.submit("alice", priority=10) for _ in range(20)]
    world.clock.shift += 1
    late = world.submit("bob")
    order: list[str] = []
    for _ in range(40):
        world.tick()
        order += [j for j in [*flood, late] if world.job(j).status == "running" and j not in order]
        world.hosts.step()
        if late in order:
            break
    assert order == [flood[0], late]  # Bob's job is second: its fair turn


def test_what_a_reservation_holds_leaves_only_the_rest_to_others() -> None:
    free = [{"CPU": 1.0}]
    two_workers = [CPU, CPU]
    assert held_beside([two_workers], free) == [{"CPU": 0.0}]  # what fits now is kept
    assert place_beside([CPU], free, [two_workers]) is None  # a 1-worker host may not take it
    assert place_beside([CPU], free, []) == [{"CPU": 0.0}]
    assert place_beside([CPU], [{"CPU": 3.0}], [two_workers]) == [{"CPU": 2.0}]


def test_the_hosts_drained_are_the_fewest_that_free_enough_emptiest_first() -> None:
    hosts = [
        HostHolding("busy", SHAPE, [CPU], jobs=4),
        HostHolding("light", SHAPE, [CPU], jobs=1),
        HostHolding("warm", SHAPE, [CPU], jobs=0, warm=True),
    ]
    need = [CPU, CPU]
    assert hosts_to_drain(need, [{"CPU": 1.0}], hosts, starts_left=1) == ["light"]
    assert hosts_to_drain(need, [{"CPU": 0.0}], hosts, starts_left=1) == ["light", "busy"]
    assert hosts_to_drain(need, [{"CPU": 2.0}], hosts, starts_left=1) == []  # fits now
    # No start left under max_concurrent_runs: one host must end even if CPUs are free.
    assert hosts_to_drain(need, [{"CPU": 2.0}], hosts, starts_left=0) == ["light"]


def test_a_job_reserves_once_after_the_set_time_and_is_forgotten_once_started() -> None:
    book = Reservations(reserve_after_seconds=30)
    assert book.unplaced(["big"], now=100) == []
    assert book.unplaced(["big"], now=129) == []
    assert book.unplaced(["big"], now=130) == ["big"]
    assert book.unplaced(["big"], now=140) == []  # once
    assert book.age("big", now=145) == 15
    book.keep(set())
    assert book.age("big", now=150) is None and "big" not in book.waiting_since


def submit(world: World, tenant: str, workers: int) -> str:
    settings = resolve_settings(
        NewJob(
            model="tiny", training_file="file-x", batch_size=4, resources={"num_workers": workers}
        ),
        2,
    )
    job = job_row(
        tenant=tenant,
        status=JobStatus.QUEUED.value,
        created_at=int(world.clock()),
        settings=settings,
    )
    return world.store.add_job(job, "created").id


def big_job_under_a_stream_of_small_ones(world: World, rounds: int) -> tuple[str, int | None]:
    """Two CPUs; 1-worker jobs keep arriving (one each 5 s, 3 steps each) and a 2-worker job
    waits among them. Returns the big job and the round it started in (None: never)."""
    world.hosts.nodes = [{"CPU": 2.0}]
    world.hosts.steps_per_job = 3
    for _ in range(2):
        submit(world, "small", 1)
    world.tick()
    big = submit(world, "big", 2)
    for round_ in range(rounds):
        world.clock.shift += 5
        submit(world, "small", 1)
        world.tick()
        if world.job(big).status == "running":
            return big, round_
        world.hosts.step()
    return big, None


def test_a_waiting_2_worker_job_starts_in_bounded_time_while_1_worker_jobs_keep_coming(
    tmp_path: Path,
) -> None:
    world = make_world(
        tmp_path, max_concurrent_runs=8, max_slots_per_host=2, reserve_after_seconds=30
    )
    big, started_in = big_job_under_a_stream_of_small_ones(world, rounds=40)
    assert started_in is not None, world.events(big)
    # 30 s to reserve (6 rounds), a round to close the hosts it needs, at most 3 steps for
    # their jobs to end, and a round for an idle host to end: about 11 rounds, not 40.
    assert started_in <= 12
    reserved = [e for e in world.events(big) if "reserved for this job" in e.message]
    assert len(reserved) == 1
    assert reserved[0].data["waited_seconds"] >= 30
    assert reserved[0].data["reserved_for"] == "tiny/2xcpu/fp32"
    started = [e.message for e in world.events(big) if e.message.startswith("Fine-tuning job")]
    assert "after a reservation held" in started[-1]
    # Small jobs start again once it has run.
    small = submit(world, "small", 1)
    for _ in range(20):
        world.clock.shift += 5
        world.tick()
        world.hosts.step()
    assert world.job(big).status == "succeeded"
    assert world.job(small).status in ("running", "succeeded")


def test_without_a_reservation_the_stream_starves_it(tmp_path: Path) -> None:
    """The same stream with reservations off (reserve after a day): it never starts, so the
    test above measures the reservation, not luck."""
    world = make_world(
        tmp_path, max_concurrent_runs=8, max_slots_per_host=2, reserve_after_seconds=86400
    )
    big, started_in = big_job_under_a_stream_of_small_ones(world, rounds=40)
    assert started_in is None


def test_a_reserved_job_goes_first_and_closed_hosts_take_no_job_and_end_once_idle() -> None:
    small = [WaitingJob(f"s{i}", "small", SHAPE, created_at=i) for i in range(3)]
    big = WaitingJob("big", "big", "tiny/2xcpu/fp32", created_at=9, reserved=True)
    hosts = [
        HostRoom("host-busy", SHAPE, 4, demands=[SlotDemand(1, 8, 8)]),
        HostRoom("host-idle", SHAPE, 4),
        HostRoom("host-open", SHAPE, 4),
    ]
    ids = (f"host-new-{i}" for i in itertools.count())
    plan = plan_admissions(
        [*small, big],
        hosts,
        running_per_tenant={"big": 0, "small": 5},
        free_host_starts=1,
        max_slots=4,
        fits=fits_any,
        new_host_id=lambda: next(ids),
        closed={"host-busy", "host-idle"},
    )
    assert plan.joins[0] == Join("big", "host-new-0")  # first, though its tenant is new
    assert {j.host_id for j in plan.joins[1:]} == {"host-open"}  # never a closed host
    assert plan.retire == ["host-idle"]  # the idle closed one ends now; the busy one drains
