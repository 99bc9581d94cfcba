"""One hung run must not stall the scheduler: it costs only its own jobs, is noticed once
per stall (a warning event and a Prometheus counter), and after a few missed polls in a row
its jobs are requeued. Real Ray actors on the session's cluster stand in for runs."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray

from core.objectstore import open_object_store
from orchestrator.db import make_engine, migrate
from orchestrator.metrics import REGISTRY
from orchestrator.scheduling.ray_runs import RayRuns
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.tables import JobRow
from tests.conftest import job_row
from workers.run_actor import run_actor_name

POLL_TIMEOUT_S = 1.0


def start_fake_run(run_id: str, hang_s: float) -> Any:
    """A named actor that answers `poll` like a RunActor, after `hang_s` seconds."""

    @ray.remote(num_cpus=0)
    class FakeRun:
        def __init__(self) -> None:
            self.polls = 0

        def poll(self, job_id: str, cursor: int) -> dict[str, Any]:
            time.sleep(hang_s)
            self.polls += 1
            event = {"type": "message", "message": f"{job_id} alive ({self.polls})"}
            return {"state": "running", "events": [event], "cursor": cursor + 1}

        def stop(self, job_id: str) -> None:
            pass

        def finished(self) -> bool:
            return False

    actor = FakeRun.options(name=run_actor_name(run_id), namespace="lorafleet").remote()  # type: ignore[attr-defined]
    ray.get(actor.finished.remote())  # started and answering
    return actor


def running_job(store: JobStore, run_id: str) -> JobRow:
    settings = {"resources": {"num_workers": 1, "use_gpu": False}, "training": {}}
    job = store.add_job(job_row(settings=settings), "Created")
    store.queue(job.id, "queued")
    return store.claim(job.id, 0, run_id, "started")


def timeouts_counted() -> float:
    return REGISTRY.get_sample_value("lorafleet_run_poll_timeouts_total") or 0.0


def warnings_of(store: JobStore, job_id: str) -> list[str]:
    return [e.message for e in store.events_since(job_id, 0) if e.level == "warn"]


@pytest.mark.slow
def test_a_hung_run_costs_only_its_own_jobs(ray_address: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'lorafleet.db'}",
        object_store=str(tmp_path / "objects"),
        ray_address=ray_address,
        scheduling_mode="window",  # this test is about runs (one actor per pack), not hosts
        run_poll_timeout_seconds=POLL_TIMEOUT_S,
        max_run_poll_timeouts=3,
        pack_window_seconds=3600,  # a requeued job waits: nothing new is launched here
    )
    engine = make_engine(settings.database_url)
    migrate(engine)
    store = JobStore(engine)
    tag = uuid.uuid4().hex[:8]
    hung_run, healthy_run = f"run-hung-{tag}", f"run-ok-{tag}"
    actors = [start_fake_run(hung_run, hang_s=60), start_fake_run(healthy_run, hang_s=0)]
    try:
        hung, healthy = running_job(store, hung_run), running_job(store, healthy_run)
        scheduler = Scheduler(
            settings, store, open_object_store(settings.object_store_config), RayRuns(settings)
        )
        before = timeouts_counted()

        started = time.monotonic()
        assert scheduler.tick_safely()  # the hung run does not abort the tick
        assert time.monotonic() - started < 3 * POLL_TIMEOUT_S + 2  # one wait, not one per run
        assert store.job(healthy.id).event_cursor == 1  # its events landed in the same tick
        assert store.job(hung.id).status == "running"  # only slow so far: left running
        assert len(warnings_of(store, hung.id)) == 1 and warnings_of(store, healthy.id) == []
        assert timeouts_counted() == before + 1

        assert scheduler.tick_safely()
        assert store.job(healthy.id).event_cursor == 2
        assert len(warnings_of(store, hung.id)) == 1  # once per stall, not once per tick
        assert store.job(hung.id).status == "running"

        assert scheduler.tick_safely()  # the third miss in a row: lost to the infrastructure
        row = store.job(hung.id)
        assert (row.status, row.attempt) == ("queued", 1)
        assert "did not answer 3 polls" in [e.message for e in store.events_since(hung.id, 0)][-1]
        assert timeouts_counted() == before + 3
        assert store.job(healthy.id).status == "running"
        assert store.job(healthy.id).event_cursor == 3
    finally:
        for actor in actors:
            ray.kill(actor)


def test_runs_are_found_and_reaped_in_the_configured_namespace(
    ray_address: str, tmp_path: Path
) -> None:
    namespace = f"lf-test-{uuid.uuid4().hex[:8]}"
    run_id = f"run-ns-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    class FinishedRun:
        def poll(self, job_id: str, cursor: int) -> dict[str, Any]:
            return {"state": "succeeded", "events": [], "cursor": cursor}

        def finished(self) -> bool:
            return True

    actor = FinishedRun.options(name=run_actor_name(run_id), namespace=namespace).remote()  # type: ignore[attr-defined]
    ray.get(actor.finished.remote())
    try:
        ours = RayRuns(
            Settings(data_dir=tmp_path, ray_address=ray_address, ray_namespace=namespace)
        )
        default = RayRuns(Settings(data_dir=tmp_path, ray_address=ray_address))
        assert default.poll(run_id, "ftjob-x", 0) is None  # not in the default namespace
        assert run_id not in default.reap(set())
        assert ours.poll(run_id, "ftjob-x", 0) == {"state": "succeeded", "events": [], "cursor": 0}
        assert ours.reap({run_id}) == []  # a live job still needs it
        assert ours.reap(set()) == [run_id]
        assert ours.poll(run_id, "ftjob-x", 0) is None
    finally:
        ray.kill(actor)
