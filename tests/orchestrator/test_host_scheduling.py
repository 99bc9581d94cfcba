"""Scheduling on in-memory pack hosts and a real SQLite store: admission,
joining, fencing, cancel, retries and the watchdog, each in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from core.memory_estimate import BaseShape, RunShape, SlotDemand, estimate_rank_bytes
from core.objectstore import ObjectStore, ObjectStoreConfig, open_object_store
from orchestrator.db import make_engine, migrate
from orchestrator.jobs import NewJob, cancel_job, resolve_settings
from orchestrator.scheduling.host_scheduling import HostScheduling
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.tables import JobRow
from tests.conftest import job_row
from tests.fakes.in_memory_hosts import InMemoryHosts
from tests.orchestrator.test_memory_estimate import write_base

BASE_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


class Clock:
    """Wall time plus whatever a test fast-forwards."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


@dataclass
class World:
    settings: Settings
    store: JobStore
    objects: ObjectStore
    hosts: InMemoryHosts
    clock: Clock
    scheduling: HostScheduling

    def tick(self, scheduling: HostScheduling | None = None) -> None:
        one = scheduling or self.scheduling
        one.watch()
        one.launch()

    def submit(
        self, tenant: str = "t1", priority: int = 0, max_runtime: int | None = None, **training: Any
    ) -> str:
        batch = training.pop("batch_size", 4)
        settings = resolve_settings(
            NewJob(model="tiny", training_file="file-x", batch_size=batch, training=training), 2
        )
        job = job_row(
            tenant=tenant,
            status=JobStatus.QUEUED.value,
            created_at=int(self.clock()),
            settings=settings,
            priority=priority,
            max_runtime=max_runtime,
        )
        return self.store.add_job(job, "created").id

    def job(self, job_id: str) -> JobRow:
        return self.store.job(job_id)

    def events(self, job_id: str) -> list[Any]:
        return self.store.events_since(job_id, 0)

    def other_scheduler(self) -> HostScheduling:
        return HostScheduling(self.settings, self.store, self.objects, self.hosts, clock=self.clock)


def make_world(tmp_path: Path, **overrides: Any) -> World:
    # A base folder as a real one: config.json and safetensors headers (the estimate's source).
    base = write_base(tmp_path / "tiny", BASE_CONFIG)
    settings = Settings(
        data_dir=tmp_path / "state",
        base_models={"tiny": str(base)},
        **{"max_concurrent_runs": 2, "max_slots_per_host": 4, **overrides},
    )
    engine = make_engine(settings.database_url)
    migrate(engine)
    store = JobStore(engine)
    objects = open_object_store(ObjectStoreConfig(url=str(tmp_path / "objects")))
    clock = Clock()
    hosts = InMemoryHosts(objects, clock=clock)
    return World(
        settings,
        store,
        objects,
        hosts,
        clock,
        HostScheduling(settings, store, objects, hosts, clock=clock),
    )


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield make_world(tmp_path)


def run_until_done(world: World, job_ids: list[str], ticks: int = 30) -> None:
    for _ in range(ticks):
        world.tick()
        if all(JobStatus(world.job(j).status).is_terminal() for j in job_ids):
            return
        world.hosts.step()
    raise AssertionError({j: world.job(j).status for j in job_ids})


def test_a_queued_job_starts_a_host_trains_and_succeeds(world: World) -> None:
    job_id = world.submit()
    world.tick()
    job = world.job(job_id)
    assert job.status == "running" and job.attempt == 1
    assert job.run_id in world.hosts.list_hosts()
    run_until_done(world, [job_id])
    job = world.job(job_id)
    assert job.status == "succeeded" and job.trained_tokens == 30
    steps = [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]
    assert steps == [1, 2, 3]
    assert all(
        isinstance(e.data["time"], float) for e in world.events(job_id) if e.type == "metrics"
    )
    world.tick()
    assert world.hosts.hosts[job.run_id or ""].members == {}  # released once stored


def test_a_second_job_joins_the_running_host_and_the_pack_goes_1_2_1(world: World) -> None:
    world.hosts.job_steps = {}
    a = world.submit()
    world.hosts.steps_per_job = 4
    world.tick()
    world.hosts.step()
    world.tick()
    world.hosts.steps_per_job = 2
    b = world.submit()
    world.tick()
    assert world.job(b).run_id == world.job(a).run_id
    assert len(world.hosts.started) == 1  # no second host: B joined A's
    run_until_done(world, [a, b])
    sizes = [e.data["pack_size"] for e in world.events(a) if e.type == "metrics"]
    assert sizes == [1, 2, 2, 1]


def test_one_poll_per_host_per_tick_not_per_job(world: World) -> None:
    jobs = [world.submit() for _ in range(6)]  # 4 slots per host: two hosts
    world.tick()
    assert {world.job(j).status for j in jobs} == {"running"}
    assert len(world.hosts.list_hosts()) == 2
    world.hosts.calls.clear()
    world.tick()
    polls = [host for call, host in world.hosts.calls if call == "poll"]
    assert sorted(polls) == world.hosts.list_hosts()


def test_no_room_and_no_free_host_means_the_job_waits(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_concurrent_runs=1, max_slots_per_host=2)
    jobs = [world.submit() for _ in range(3)]
    world.tick()
    assert [world.job(j).status for j in jobs] == ["running", "running", "queued"]
    run_until_done(world, jobs)
    assert len(world.hosts.started) == 1


def test_tenant_fairness_on_one_slot(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_concurrent_runs=1, max_slots_per_host=1)
    flood = [world.submit("alice") for _ in range(5)]
    world.clock.shift += 1
    late = world.submit("bob")
    order: list[str] = []
    for _ in range(60):
        world.tick()
        order += [j for j in [*flood, late] if world.job(j).status == "running" and j not in order]
        world.hosts.step()
    # One slot, so one job at a time, and when it frees nobody has a job running: the turn
    # goes to the tenant whose last job started longest ago. Alice's oldest job first, then
    # bob's one, not after alice's other four.
    assert order == [flood[0], late, *flood[1:]]


def test_jobs_are_admitted_until_the_memory_estimate_says_full(tmp_path: Path) -> None:
    base, run = BaseShape.from_config(BASE_CONFIG), RunShape(2, logits_chunk_tokens=4096)
    alone = estimate_rank_bytes(base, run, [SlotDemand(2, 1024, 8)]).parts
    # Counted as admission and the host count jobs: the base's terms once, each job's share.
    held = alone["base_shard"] + alone["live_parameters"]
    two = held + 2 * (sum(alone.values()) - held)
    world = make_world(tmp_path, host_memory_bytes=two, max_concurrent_runs=1)
    jobs = [world.submit() for _ in range(3)]
    world.tick()
    assert [world.job(j).status for j in jobs] == ["running", "running", "queued"]
    member = world.hosts.hosts[world.job(jobs[0]).run_id or ""].members[jobs[0]]
    assert member.request.memory_bytes > 0  # the scheduler tells the host what it estimated


def test_a_job_too_big_for_any_host_fails_instead_of_waiting_forever(tmp_path: Path) -> None:
    world = make_world(tmp_path, host_memory_bytes=1000)
    job_id = world.submit()
    world.tick()
    job = world.job(job_id)
    assert job.status == "failed" and job.error_code == "insufficient_memory"


def test_cancel_stops_the_job_at_the_next_step(world: World) -> None:
    world.hosts.steps_per_job = 10
    job_id = world.submit()
    world.tick()
    world.hosts.step()
    cancel_job(world.store, "t1", job_id)
    run_until_done(world, [job_id])
    assert world.job(job_id).status == "cancelled"


def test_a_failed_job_fails_with_the_hosts_code_and_the_others_go_on(world: World) -> None:
    a, b = world.submit(), world.submit()
    world.tick()
    world.hosts.fail_job(a, "loss became nan", "training_error")
    run_until_done(world, [a, b])
    assert world.job(a).status == "failed" and world.job(a).error_code == "training_error"
    assert world.job(b).status == "succeeded"


def test_a_hung_host_is_ended_and_its_jobs_resume_on_a_new_one(world: World) -> None:
    job_id = world.submit()
    world.tick()
    hung = world.job(job_id).run_id or ""
    world.hosts.step()
    world.hosts.hang(hung)
    world.tick()
    assert world.job(job_id).status == "running"  # not yet: within the step timeout
    world.clock.shift += world.settings.step_timeout_seconds + 1
    world.tick()
    assert hung not in world.hosts.list_hosts()
    job = world.job(job_id)
    assert job.run_id != hung and job.attempt == 2 and job.status == "running"
    messages = [e.message for e in world.events(job_id)]
    assert any("made no step" in m and "requeued" in m for m in messages)
    run_until_done(world, [job_id])
    assert world.job(job_id).status == "succeeded"


def test_a_lost_host_requeues_its_jobs_after_the_start_grace(world: World) -> None:
    job_id = world.submit()
    world.tick()
    world.hosts.lose(world.job(job_id).run_id or "")
    world.scheduling.watch()
    assert world.job(job_id).status == "running"  # claimed a moment ago: grace
    world.clock.shift += world.settings.run_start_grace_seconds + 1
    world.scheduling.watch()
    assert world.job(job_id).status == "queued"
    run_until_done(world, [job_id])
    assert world.job(job_id).attempt == 2


def test_a_restarted_scheduler_adopts_the_hosts(world: World) -> None:
    world.hosts.steps_per_job = 4
    job_id = world.submit()
    world.tick()
    world.hosts.step()
    world.scheduling = world.other_scheduler()  # the first one is gone
    run_until_done(world, [job_id])
    job = world.job(job_id)
    assert job.status == "succeeded" and job.attempt == 1
    assert len(world.hosts.started) == 1
    steps = [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]
    assert steps == [1, 2, 3, 4]  # every event stored once


def test_two_schedulers_admit_a_job_once_on_the_same_host(world: World) -> None:
    first, second = world.scheduling, world.other_scheduler()
    other = world.submit()
    world.tick(first)  # a host, so both see it
    job_id = world.submit()
    stale = world.job(job_id)  # both read the queue before either claims
    first.watch()
    second.watch()
    host = next(iter(first.reports))
    first.join(stale, host)
    second.join(stale, host)  # its claim loses: it never asks the host
    job = world.job(job_id)
    assert job.attempt == 1 and job.run_id == host
    assert world.hosts.job_host(job_id) == host
    admits = [call for call in world.hosts.calls if call == ("admit", host)]
    assert len(admits) == 2 and len(world.hosts.hosts[host].members) == 2
    run_until_done(world, [job_id, other])
    assert world.job(job_id).status == "succeeded"


def test_two_schedulers_on_different_hosts_the_loser_never_admits(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_slots_per_host=1)
    world.hosts.steps_per_job = 2
    first, second = world.scheduling, world.other_scheduler()
    busy = [world.submit(), world.submit()]
    world.tick(first)  # two hosts, one job each
    run_until_done(world, busy)
    job_id = world.submit()
    stale = world.job(job_id)
    first.watch()
    second.watch()
    one, two = sorted(first.reports)
    first.join(stale, one)
    second.join(stale, two)  # the claim comes first and loses: `two` is never asked
    assert world.job(job_id).run_id == one
    assert job_id not in world.hosts.hosts[two].members
    assert ("admit", two) not in world.hosts.calls[-2:]
    run_until_done(world, [job_id])
    assert world.job(job_id).status == "succeeded" and world.job(job_id).attempt == 1


def test_warm_hosts_stay_up_with_no_job(tmp_path: Path) -> None:
    world = make_world(tmp_path, warm_hosts=1, host_idle_seconds=0)
    world.tick()
    (host,) = world.hosts.list_hosts()
    assert world.hosts.started[0].warm
    for _ in range(3):
        world.hosts.step()
        world.tick()
    assert world.hosts.list_hosts() == [host]  # neither idle-ended nor a second one
    job_id = world.submit()
    world.tick()
    assert world.job(job_id).run_id == host  # and it is capacity: the job joins it


def test_a_restarted_scheduler_adopts_a_warm_host_and_starts_no_second_one(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, warm_hosts=1, host_idle_seconds=0)
    world.tick()
    (host,) = world.hosts.list_hosts()
    world.scheduling = world.other_scheduler()  # serve restarted: warmth only from the host
    for _ in range(3):
        world.hosts.step()
        world.tick()
    assert world.hosts.list_hosts() == [host] and len(world.hosts.started) == 1
    job_id = world.submit()
    world.tick()
    assert world.job(job_id).run_id == host  # and it is capacity: the job joins it


def test_a_restarted_scheduler_never_retires_an_adopted_warm_host(tmp_path: Path) -> None:
    world = make_world(tmp_path, warm_hosts=1, host_idle_seconds=0, max_concurrent_runs=1)
    world.tick()
    (host,) = world.hosts.list_hosts()
    world.scheduling = world.other_scheduler()
    other_shape = world.submit(precision="bf16")  # no room for its host: it waits
    for _ in range(3):
        world.tick()
        world.hosts.step()
    assert world.hosts.list_hosts() == [host] and world.job(other_shape).status == "queued"


def test_priority_orders_a_tenants_own_jobs_not_another_tenants(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_concurrent_runs=1, max_slots_per_host=1)
    low = world.submit("alice")
    world.clock.shift += 5
    high = world.submit("alice", priority=5)
    world.tick()
    assert world.job(high).status == "running" and world.job(low).status == "queued"

    (tmp_path / "tenants").mkdir()
    world = make_world(tmp_path / "tenants", max_concurrent_runs=1, max_slots_per_host=1)
    first = world.submit("alice")
    world.clock.shift += 5
    pushy = world.submit("bob", priority=5)
    world.tick()  # neither tenant runs anything: the older job goes, priority aside
    assert world.job(first).status == "running" and world.job(pushy).status == "queued"


def test_a_job_past_its_max_runtime_fails_with_timeout_and_leaves_the_host(world: World) -> None:
    world.hosts.steps_per_job = 100
    slow, other = world.submit(max_runtime=30), world.submit()
    world.tick()
    host = world.job(slow).run_id or ""
    world.hosts.step()
    world.tick()
    assert world.job(slow).status == "running"
    world.clock.shift += 31
    world.tick()
    job = world.job(slow)
    assert job.status == "failed" and job.error_code == "timeout"
    assert "max_runtime" in (job.error_message or "")
    world.hosts.step()  # the host drops it at the next step boundary …
    world.tick()
    assert slow not in world.hosts.hosts[host].members  # … and it is released
    assert world.job(other).status == "running"  # the other job goes on


def test_max_runtime_counts_the_jobs_whole_life_across_attempts(tmp_path: Path) -> None:
    """A job 20 s into its 30 s whose host is lost resumes elsewhere with the 10 s left (the
    new host is told so), and fails with `timeout` 11 s into its second attempt."""
    world = make_world(tmp_path, run_start_grace_seconds=0)
    world.hosts.steps_per_job = 100
    slow = world.submit(max_runtime=30)
    world.tick()
    first = world.job(slow)
    assert first.first_started_at == first.started_at is not None
    with world.store.sessions.begin() as session:  # it started 20 s ago
        row = session.get(JobRow, slow)
        assert row is not None and row.started_at is not None
        row.first_started_at = row.started_at = row.started_at - 20
    world.hosts.lose(first.run_id or "")
    world.tick()  # requeued, and placed on a new host at once
    second = world.job(slow)
    assert second.attempt == 2 and second.run_id != first.run_id
    assert second.first_started_at == (first.started_at or 0) - 20  # the first claim's only
    assert (second.started_at or 0) >= (first.started_at or 0)  # the current attempt's
    request = world.hosts.hosts[second.run_id or ""].members[slow].request
    assert request.max_runtime_seconds is not None and 8 < request.max_runtime_seconds <= 10
    world.clock.shift += 11
    world.tick()
    job = world.job(slow)
    assert job.status == "failed" and job.error_code == "timeout"


def test_a_job_left_in_a_run_of_its_own_by_an_older_lorafleet_resumes_on_a_host(
    tmp_path: Path,
) -> None:
    """Before hosts were the only path, a job could train in a run actor (`run-…`); after an
    upgrade nothing answers for it: it is requeued and trains on a pack host."""
    world = make_world(tmp_path, run_start_grace_seconds=0)
    job_id = world.submit()
    world.store.claim(job_id, 0, "run-from-before", "Fine-tuning job started (attempt 1)")
    run_until_done(world, [job_id])
    job = world.job(job_id)
    assert job.status == "succeeded" and job.attempt == 2
    assert (job.run_id or "").startswith("host-")


def test_priority_and_max_runtime_come_from_the_request() -> None:
    from pydantic import ValidationError

    from api.schemas import FineTuningJobCreate

    body = FineTuningJobCreate(model="m", training_file="f", priority=3, max_runtime=60)
    assert (body.priority, body.max_runtime) == (3, 60)
    assert FineTuningJobCreate(model="m", training_file="f").priority == 0
    with pytest.raises(ValidationError):
        FineTuningJobCreate(model="m", training_file="f", max_runtime=0)


def unpacked(world: World, tenant: str = "t1") -> str:
    """A queued job that asks not to be packed (`training.packing: false`)."""
    job_id = world.submit(tenant=tenant)
    with world.store.sessions.begin() as session:
        row = session.get(JobRow, job_id)
        assert row is not None
        row.settings = row.settings.model_copy(update={"packing": False})
    return job_id


def test_an_unpacked_job_trains_alone_on_a_host_of_one_slot_that_admits_no_one_else(
    world: World,
) -> None:
    alone = unpacked(world)
    world.tick()
    [spec] = world.hosts.started
    assert (spec.exclusive, spec.max_slots, spec.idle_seconds) == (True, 1, 0.0)
    assert world.job(alone).run_id == spec.host_id
    packed = world.submit()  # of the same shape: it gets a host of its own, never that one
    world.tick()
    assert world.job(packed).run_id not in (None, spec.host_id)
    assert world.hosts.started[-1].exclusive is False
    # Even with a free slot (its job gone), the scheduler sends no one to an exclusive host,
    # and the host itself refuses a second member while one runs.
    report = world.hosts.poll(spec.host_id, {})
    assert report is not None and report["exclusive"] and report["max_slots"] == 1
    request = world.hosts.hosts[spec.host_id].members[alone].request
    other = replace(request, job=replace(request.job, job_id="ftjob-other"))
    assert not world.hosts.admit(spec.host_id, other).admitted
    run_until_done(world, [alone, packed])


def test_unpacked_jobs_count_against_max_concurrent_runs_like_any_host(tmp_path: Path) -> None:
    world = make_world(tmp_path, max_concurrent_runs=2)
    first, second, third = unpacked(world), unpacked(world, tenant="t2"), world.submit()
    world.tick()
    assert {world.job(j).status for j in (first, second)} == {"running"}
    assert world.job(first).run_id != world.job(second).run_id
    assert world.job(third).status == "queued" and len(world.hosts.started) == 2
