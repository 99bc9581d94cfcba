"""The job store on SQLite and PostgreSQL: guarded transitions, events, fencing, paging."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from orchestrator.db import make_engine, migrate
from orchestrator.errors import InvalidTransition, NotFound
from orchestrator.models import JobEventRow, JobRow
from orchestrator.states import JobStatus
from orchestrator.store import JobStore, new_id, now


@pytest.fixture()
def store(database_url: str) -> JobStore:
    engine = make_engine(database_url)
    migrate(engine)
    migrate(engine)  # a second start finds the schema current
    return JobStore(engine)


def add_job(store: JobStore, tenant: str = "t1", created_at: int | None = None) -> JobRow:
    return store.add_job(
        JobRow(
            id=new_id("ftjob"),
            tenant=tenant,
            model="tiny",
            training_file="file-x",
            seed=1,
            status=JobStatus.VALIDATING_FILES.value,
            attempt=0,
            created_at=created_at if created_at is not None else now(),
            settings={},
            event_cursor=0,
        ),
        "Created",
    )


def statuses_in_events(store: JobStore, job_id: str) -> list[str]:
    with store.sessions() as session:
        rows = session.scalars(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.seq)
        )
        return [r.data["status"] for r in rows if r.data and "status" in r.data]


def test_transitions_follow_the_table_and_each_appends_an_event(store: JobStore) -> None:
    job = add_job(store)
    for target in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
        row = store.transition(job.id, target, f"to {target.value}")
        assert row.status == target.value
    assert statuses_in_events(store, job.id) == [
        "validating_files",
        "queued",
        "running",
        "succeeded",
    ]


def test_a_transition_not_in_the_table_raises_and_changes_nothing(store: JobStore) -> None:
    job = add_job(store)
    with pytest.raises(InvalidTransition) as raised:
        store.transition(job.id, JobStatus.SUCCEEDED, "skip ahead", finished_at=123)
    assert raised.value.current == "validating_files"
    row = store.job(job.id)
    assert row.status == "validating_files" and row.finished_at is None
    assert statuses_in_events(store, job.id) == ["validating_files"]


def test_a_terminal_job_never_changes_again(store: JobStore) -> None:
    job = add_job(store)
    store.transition(job.id, JobStatus.CANCELLED, "cancelled")
    for target in JobStatus:
        with pytest.raises(InvalidTransition):
            store.transition(job.id, target, "again")
    assert store.job(job.id).status == "cancelled"
    assert statuses_in_events(store, job.id) == ["validating_files", "cancelled"]


def test_a_stale_attempt_cannot_move_the_job(store: JobStore) -> None:
    job = add_job(store)
    store.transition(job.id, JobStatus.QUEUED, "queued")
    store.transition(
        job.id, JobStatus.RUNNING, "run 1", expected_attempt=0, attempt=JobRow.attempt + 1
    )
    store.transition(job.id, JobStatus.QUEUED, "lost", expected_attempt=1)
    store.transition(
        job.id, JobStatus.RUNNING, "run 2", expected_attempt=1, attempt=JobRow.attempt + 1
    )
    with pytest.raises(InvalidTransition):
        store.transition(job.id, JobStatus.SUCCEEDED, "from run 1", expected_attempt=1)
    assert not store.record_run_events(job.id, 1, [{"message": "stale"}], cursor=5)
    row = store.job(job.id)
    assert (row.status, row.attempt, row.event_cursor) == ("running", 2, 0)


def test_concurrent_claims_let_exactly_one_win(store: JobStore) -> None:
    job = add_job(store)
    store.transition(job.id, JobStatus.QUEUED, "queued")
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        try:
            store.transition(
                job.id, JobStatus.RUNNING, "claimed", expected_attempt=0, attempt=JobRow.attempt + 1
            )
            wins.append(1)
        except InvalidTransition:
            losses.append(1)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(wins), len(losses)) == (1, 7)
    assert store.job(job.id).attempt == 1
    assert statuses_in_events(store, job.id).count("running") == 1


def test_jobs_page_newest_first_and_stay_within_their_tenant(store: JobStore) -> None:
    ids = [add_job(store, created_at=1000 + i).id for i in range(5)]
    other = add_job(store, tenant="t2", created_at=2000)
    page, has_more = store.list_jobs("t1", after=None, limit=2)
    assert [r.id for r in page] == [ids[4], ids[3]] and has_more
    page, has_more = store.list_jobs("t1", after=ids[3], limit=10)
    assert [r.id for r in page] == [ids[2], ids[1], ids[0]] and not has_more
    with pytest.raises(NotFound):
        store.get_job("t1", other.id)


def test_run_events_are_stored_in_order_with_the_cursor(store: JobStore) -> None:
    job = add_job(store)
    events = [{"type": "metrics", "message": f"step {i}", "data": {"step": i}} for i in range(1, 4)]
    assert store.record_run_events(job.id, 0, events, cursor=3, trained_tokens=42)
    row = store.job(job.id)
    assert (row.event_cursor, row.trained_tokens) == (3, 42)
    newest, has_more = store.list_events("t1", job.id, after=None, limit=2)
    assert [e.message for e in newest] == ["step 3", "step 2"] and has_more
    older, has_more = store.list_events("t1", job.id, after=newest[-1].id, limit=10)
    assert [e.message for e in older] == ["step 1", "Created"] and not has_more
    assert [e.type for e in store.events_since(job.id, 0)] == ["message", *["metrics"] * 3]


def test_two_schedulers_storing_the_same_run_events_store_them_once(store: JobStore) -> None:
    job = add_job(store)
    events = [{"type": "metrics", "message": "step 1", "data": {"step": 1}}]
    assert store.record_run_events(job.id, 0, events, cursor=1)
    assert not store.record_run_events(job.id, 0, events, cursor=1)  # the slower one
    assert [e.message for e in store.events_since(job.id, 0)] == ["Created", "step 1"]
