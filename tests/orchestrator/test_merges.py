"""The scheduler's merge bookkeeping (orchestrator/merges.py) with a runner that merges
nothing: a failed merge is told once and runs again when asked, a merge whose scheduler went
away is queued again, and what a merge wrote after its model was deleted goes too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import update

from core.merged_files import MergeOutcome, MergeRequest
from core.objectstore import ObjectStoreConfig, open_object_store
from orchestrator.db import make_engine, migrate
from orchestrator.errors import Conflict
from orchestrator.merges import MergeScheduling, delete_model, merged_weights
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.store.merges import MergeStore
from orchestrator.tables import MergeRow
from tests.conftest import job_row


class HeldMerges:
    """A MergeRunner whose merges end when the test says."""

    def __init__(self) -> None:
        self.started: dict[str, MergeRequest] = {}
        self.ended: list[MergeOutcome] = []

    def start(self, request: MergeRequest) -> None:
        self.started[request.merge_id] = request

    def running(self) -> set[str]:
        return set(self.started)

    def finished(self) -> list[MergeOutcome]:
        ended, self.ended = self.ended, []
        for outcome in ended:
            self.started.pop(outcome.merge_id)
        return ended


@pytest.fixture()
def parts(tmp_path: Path) -> tuple[Settings, JobStore, MergeStore, object, HeldMerges, str]:
    settings = Settings(data_dir=tmp_path / "state", base_models={"tiny": str(tmp_path)})
    engine = make_engine(settings.database_url)
    migrate(engine)
    store = JobStore(engine)
    objects = open_object_store(ObjectStoreConfig(url=str(tmp_path / "objects")))
    job = job_row(status="succeeded", fine_tuned_model="ft:tiny::m")
    store.add_job(job, "created")
    return settings, store, MergeStore(engine), objects, HeldMerges(), job.id


def test_a_failed_merge_is_told_once_then_runs_again(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store, merges, objects, runner, job_id = parts
    scheduling = MergeScheduling(settings, store, merges, objects, runner)
    ask = lambda: merged_weights(store, merges, objects, settings, "t1", job_id, 0.25)  # noqa: E731
    assert ask().status == "queued"
    scheduling.tick()
    [started] = runner.started.values()
    assert started.scale == "0.25" and started.adapter_prefix.startswith("adapters/t1/")
    assert ask().status == "running"
    runner.ended.append(MergeOutcome(started.merge_id, job_id, error="MergeError: no weights"))
    scheduling.tick()
    with pytest.raises(Conflict, match="no weights"):
        ask()
    assert ask().status == "queued"  # asked again: it runs again
    scheduling.tick()
    assert len(runner.started) == 1


def test_a_merge_nobody_heartbeats_is_queued_again_and_run_here(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store, merges, objects, runner, job_id = parts
    scheduling = MergeScheduling(settings, store, merges, objects, runner)
    orphan = merges.request("t1", job_id, "final", "1")
    ours = merges.request("t1", job_id, "final", "0.5")
    assert merges.claim(orphan.id)
    with merges.sessions.begin() as session:  # its scheduler went away long ago
        session.execute(
            update(MergeRow).where(MergeRow.id == orphan.id).values(heartbeat_at=time.time() - 999)
        )
    scheduling.tick()  # the orphan back in the queue, and (the oldest) started here
    assert set(runner.started) == {orphan.id}
    assert merges.by_id(orphan.id).status == "running"  # type: ignore[union-attr]
    assert merges.by_id(ours.id).status == "queued"  # type: ignore[union-attr]  # one at a time
    # A merge this scheduler runs is never taken for an orphan, however old its heartbeat.
    assert merges.requeue_stale(-1.0, keep={orphan.id}) == 0


def test_what_a_merge_writes_after_its_model_was_deleted_is_removed(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store, merges, objects, runner, job_id = parts
    scheduling = MergeScheduling(settings, store, merges, objects, runner)
    merged_weights(store, merges, objects, settings, "t1", job_id, 1.0)
    scheduling.tick()
    [started] = runner.started.values()
    delete_model(store, merges, objects, settings.base_models, "t1", "ft:tiny::m")
    objects.put_bytes(started.prefix + "model.safetensors", b"late")  # the task still writes
    runner.ended.append(MergeOutcome(started.merge_id, job_id, bytes=4))
    scheduling.tick()
    assert objects.list(f"merged/t1/{job_id}/") == []
    assert store.job(job_id).model_deleted_at is not None
