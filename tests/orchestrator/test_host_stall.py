"""A pack host that stops answering (in memory: the fake's `stall`, as a stopped process or a
cut-off node would): its own jobs wait, then requeue; every other host and job goes on, and
each tick completes. The same on real Ray with the host actor SIGSTOPped:
tests/e2e/test_stopped_host_actor.py."""

from __future__ import annotations

from pathlib import Path

from orchestrator.metrics import REGISTRY
from tests.orchestrator.test_host_scheduling import make_world, run_until_done


def poll_timeouts() -> float:
    return REGISTRY.get_sample_value("lorafleet_run_poll_timeouts_total") or 0.0


def metrics_steps(world, job_id: str) -> list[int]:  # type: ignore[no-untyped-def]
    return [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]


def test_a_silent_host_costs_only_its_own_jobs(tmp_path: Path) -> None:
    # One job per host, so the stalled host holds exactly one of them.
    world = make_world(
        tmp_path,
        max_slots_per_host=1,
        max_concurrent_runs=4,
        run_poll_timeout_seconds=2,
        max_run_poll_timeouts=3,
    )
    world.hosts.steps_per_job = 20
    stalled_job, other = world.submit("alice"), world.submit("bob")
    world.tick()
    world.hosts.step()
    world.tick()
    silent = world.job(stalled_job).run_id or ""
    world.hosts.stall(silent)
    before, steps_before = poll_timeouts(), metrics_steps(world, other)[-1]

    for _ in range(3):  # within the allowance: waited for, not requeued
        world.clock.shift += 1.5
        world.tick()
        world.hosts.step()
    assert world.job(stalled_job).status == "running" and world.job(stalled_job).attempt == 1
    warnings = [e for e in world.events(stalled_job) if "did not answer" in e.message]
    assert len(warnings) == 1  # one per stall, not one per tick
    assert warnings[0].level == "warn" and warnings[0].data["host_id"] == silent
    assert poll_timeouts() - before == 2  # 4.5 s silent: two 2 s timeouts missed
    assert ("hosts", "unresponsive") in world.scheduling.capacity().hosts

    # The rest of the cluster goes on: the other job steps, a new job starts.
    assert metrics_steps(world, other)[-1] >= steps_before + 2
    newcomer = world.submit("carol")
    world.tick()
    assert world.job(newcomer).status == "running"
    assert world.job(newcomer).run_id != silent

    world.clock.shift += 2  # 6.5 s: three timeouts in a row
    world.tick()
    assert silent not in world.hosts.list_hosts()  # ended
    lost = [e.message for e in world.events(stalled_job) if e.message.startswith("Run lost")]
    assert len(lost) == 1 and "did not answer 3 polls in a row" in lost[0]
    run_until_done(world, [stalled_job, other, newcomer], ticks=80)
    job = world.job(stalled_job)
    assert job.status == "succeeded" and job.attempt == 2 and job.run_id != silent
    assert world.job(other).status == "succeeded" and world.job(other).attempt == 1


def test_a_host_that_answers_again_is_not_requeued_and_a_new_stall_warns_again(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, run_poll_timeout_seconds=2, max_run_poll_timeouts=3)
    world.hosts.steps_per_job = 20
    job_id = world.submit()
    world.tick()
    host = world.job(job_id).run_id or ""
    for _ in range(2):
        world.hosts.stall(host)
        world.clock.shift += 3
        world.tick()
        world.hosts.hosts[host].silent_since = None  # it answers again (SIGCONT)
        world.hosts.hosts[host].hung = False
        world.tick()
    assert world.job(job_id).status == "running" and world.job(job_id).attempt == 1
    warnings = [e for e in world.events(job_id) if "did not answer" in e.message]
    assert len(warnings) == 2


def test_an_admit_a_silent_host_does_not_answer_keeps_the_claim(tmp_path: Path) -> None:
    """It may still run the admit: giving the attempt back could let a second host train
    it. The claim stays, and the silent host's watch requeues the job."""
    world = make_world(tmp_path, run_poll_timeout_seconds=2, max_run_poll_timeouts=3)
    busy = world.submit()
    world.tick()
    host = world.job(busy).run_id or ""
    job_id = world.submit()
    world.scheduling.watch()
    world.hosts.stall(host)
    world.scheduling.join(world.job(job_id), host)
    job = world.job(job_id)
    assert (job.status, job.attempt, job.run_id) == ("running", 1, host)
    world.clock.shift += 7
    world.tick()  # requeued, and placed again at once
    job = world.job(job_id)
    assert job.attempt == 2 and job.run_id != host
    run_until_done(world, [job_id, busy])
    assert world.job(job_id).attempt == 2 and world.job(job_id).status == "succeeded"
