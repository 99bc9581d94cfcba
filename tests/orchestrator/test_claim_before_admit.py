"""No attempt trains twice: a job is claimed in the database before a host admits it. A host
that refuses gives the claim back (the attempt not spent); a database that dies right after
an admit leaves the job on that one host, which the scheduler finds again once it is back."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from core.host_protocol import AdmissionRequest, AdmissionResult
from tests.orchestrator.test_database_outage import own_postgres, start_again, stop_immediately
from tests.orchestrator.test_host_scheduling import make_world, run_until_done
from tests.services import postgres as postgres_service

__all__ = ["own_postgres"]  # a fixture, used by name


def test_a_host_that_refuses_gives_the_claim_back_without_spending_an_attempt(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, max_slots_per_host=1)
    busy = world.submit()
    world.tick()
    host = world.job(busy).run_id or ""
    job_id = world.submit()
    world.scheduling.watch()
    world.scheduling.join(world.job(job_id), host)  # as a stale plan would: it is full
    job = world.job(job_id)
    assert (job.status, job.attempt) == ("queued", 0)
    assert job_id not in world.hosts.hosts[host].members
    given_back = [e.message for e in world.events(job_id) if "did not take" in e.message]
    assert len(given_back) == 1 and "attempt 1 not spent" in given_back[0]
    run_until_done(world, [job_id, busy])
    job = world.job(job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.run_id != host


@pytest.mark.faults
def test_a_database_that_dies_right_after_an_admit_leaves_the_job_on_one_host(
    own_postgres: postgres_service.Postgres, tmp_path: Path
) -> None:
    url = own_postgres.create_database("claims")
    own_postgres.psql("ALTER DATABASE claims SET synchronous_commit = on")
    world = make_world(tmp_path, database_url=url, max_slots_per_host=2, max_concurrent_runs=2)
    hosts = world.hosts
    # Host Q full with two jobs, one of them short; then host P with one short job.
    short_on_q, long_on_q = world.submit(), world.submit()
    hosts.job_steps = {short_on_q: 2, long_on_q: 40}
    world.tick()
    q = world.job(short_on_q).run_id or ""
    short_on_p = world.submit()
    hosts.job_steps[short_on_p] = 2
    world.tick()
    p = world.job(short_on_p).run_id or ""
    assert p != q

    # The job under test goes to P (Q is full), and the database dies right after the admit.
    job_id = world.submit()
    hosts.job_steps[job_id] = 6
    admitted_on: list[str] = []
    admit = hosts.admit

    def admit_then_lose_the_database(host_id: str, request: AdmissionRequest) -> AdmissionResult:
        result = admit(host_id, request)
        if request.job_id == job_id and result.admitted:
            admitted_on.append(host_id)
            if len(admitted_on) == 1:
                stop_immediately(own_postgres)
        return result

    hosts.admit = admit_then_lose_the_database  # type: ignore[method-assign]
    with contextlib.suppress(DBAPIError):  # whatever the tick did after the admit
        world.tick()
    assert admitted_on == [p]

    # While the database is away the hosts go on: both short jobs end, freeing a slot on
    # Q and emptying P (as the database will see it), so a job still queued would now go
    # to Q, the busier host.
    for _ in range(3):
        hosts.step()
        with pytest.raises(DBAPIError):
            world.tick()
    start_again(own_postgres)
    run_until_done(world, [job_id, short_on_q, short_on_p], ticks=40)

    assert admitted_on == [p]  # one host ever took it
    job = world.job(job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.run_id == p
    steps = [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6]  # trained once: every step stored once
