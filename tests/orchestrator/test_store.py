"""The job store on SQLite and PostgreSQL: guarded transitions, events, fencing, paging."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import event, select

from core.job_settings import JobSettings
from orchestrator.db import make_engine, migrate
from orchestrator.errors import InvalidTransition, NotFound
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.tables import JobEventRow, JobRow
from tests.conftest import job_row


@pytest.fixture()
def store(database_url: str) -> JobStore:
    engine = make_engine(database_url)
    migrate(engine)
    migrate(engine)  # a second start finds the schema current
    return JobStore(engine)


def add_job(store: JobStore, tenant: str = "t1", created_at: int | None = None) -> JobRow:
    created = {} if created_at is None else {"created_at": created_at}
    return store.add_job(job_row(tenant=tenant, **created), "Created")


def statuses_in_events(store: JobStore, job_id: str) -> list[str]:
    with store.sessions() as session:
        rows = session.scalars(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.seq)
        )
        return [r.data["status"] for r in rows if r.data and "status" in r.data]


def test_transitions_follow_the_table_and_each_appends_an_event(store: JobStore) -> None:
    job = add_job(store)
    assert store.queue(job.id, "queued").status == "queued"
    running = store.claim(job.id, 0, "run-1", "started")
    assert (running.status, running.attempt, running.run_id) == ("running", 1, "run-1")
    done = store.succeed(job.id, 1, "ft:tiny::x", "done")
    assert (done.status, done.fine_tuned_model) == ("succeeded", "ft:tiny::x")
    assert done.finished_at is not None
    assert statuses_in_events(store, job.id) == [
        "validating_files",
        "queued",
        "running",
        "succeeded",
    ]


def test_an_operation_from_the_wrong_status_raises_and_changes_nothing(store: JobStore) -> None:
    job = add_job(store)
    with pytest.raises(InvalidTransition) as raised:
        store.succeed(job.id, 0, "ft:tiny::x", "skip ahead")
    assert raised.value.current == "validating_files"
    with pytest.raises(InvalidTransition):
        store.claim(job.id, 0, "run-1", "not queued yet")
    with pytest.raises(InvalidTransition):
        store.request_cancel(job.id)  # only a running job is asked to stop
    with pytest.raises(InvalidTransition):
        store.requeue(job.id, 0, "not running")
    row = store.job(job.id)
    assert (row.status, row.finished_at, row.fine_tuned_model, row.run_id) == (
        "validating_files",
        None,
        None,
        None,
    )
    assert statuses_in_events(store, job.id) == ["validating_files"]


def test_each_operation_writes_only_its_own_columns(store: JobStore) -> None:
    job = add_job(store)
    store.queue(job.id, "queued")
    store.claim(job.id, 0, "run-1", "started")
    before = store.job(job.id)
    store.request_cancel(job.id)
    after = store.job(job.id)
    assert after.status == "cancelling"
    assert (after.attempt, after.run_id, after.started_at, after.finished_at) == (
        before.attempt,
        before.run_id,
        before.started_at,
        None,
    )
    failed = store.fail(job.id, "training_error", "loss is nan", attempt=1)
    assert (failed.error_code, failed.error_message, failed.error_param) == (
        "training_error",
        "loss is nan",
        None,
    )
    assert failed.fine_tuned_model is None and failed.run_id == "run-1"


def test_the_store_offers_no_generic_column_writer() -> None:
    # The old `transition(**values)` let any caller write any column; only named operations.
    assert not hasattr(JobStore, "transition")
    with pytest.raises(TypeError):
        JobStore.record_run_events(None, "j", 0, [], 0, status="succeeded")  # type: ignore[arg-type,call-arg]


def test_a_terminal_job_never_changes_again(store: JobStore) -> None:
    job = add_job(store)
    store.cancel(job.id)
    attempts = [
        lambda: store.queue(job.id, "again"),
        lambda: store.claim(job.id, 0, "run-1", "again"),
        lambda: store.succeed(job.id, 0, "m", "again"),
        lambda: store.fail(job.id, "x", "again"),
        lambda: store.cancel(job.id),
        lambda: store.request_cancel(job.id),
        lambda: store.requeue(job.id, 0, "again"),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidTransition):
            attempt()
    assert store.job(job.id).status == "cancelled"
    assert statuses_in_events(store, job.id) == ["validating_files", "cancelled"]


def test_a_stale_attempt_cannot_move_the_job(store: JobStore) -> None:
    job = add_job(store)
    store.queue(job.id, "queued")
    store.claim(job.id, 0, "run-1", "run 1")
    store.requeue(job.id, 1, "lost")
    store.claim(job.id, 1, "run-2", "run 2")
    with pytest.raises(InvalidTransition):
        store.succeed(job.id, 1, "m", "from run 1")
    with pytest.raises(InvalidTransition):
        store.fail(job.id, "training_error", "from run 1", attempt=1)
    assert not store.record_run_events(job.id, 1, [{"message": "stale"}], cursor=5)
    assert not store.warn(job.id, 1, "stale warning", {})
    row = store.job(job.id)
    assert (row.status, row.attempt, row.event_cursor, row.run_id) == ("running", 2, 0, "run-2")


def test_the_started_event_names_its_run(store: JobStore) -> None:
    job = add_job(store)
    store.queue(job.id, "queued")
    store.claim(job.id, 0, "run-7", "started")
    started = [e for e in store.events_since(job.id, 0) if (e.data or {}).get("run_id")]
    assert [(e.data or {}).get("attempt") for e in started] == [1]
    assert (started[0].data or {})["run_id"] == "run-7"


def test_the_first_claim_alone_sets_when_the_job_first_started(store: JobStore) -> None:
    """max_runtime counts from `first_started_at`: set by the first claim, kept by later
    ones, and given back with a first attempt a host refused (it never trained)."""
    job = add_job(store)
    store.queue(job.id, "queued")
    store.claim(job.id, 0, "host-1", "started")
    store.unclaim(job.id, 1, "host-1 refused it")
    assert store.job(job.id).first_started_at is None
    first = store.claim(job.id, 0, "host-2", "started").first_started_at
    assert first is not None
    with store.sessions.begin() as session:  # as if it had started an hour ago
        row = session.get(JobRow, job.id)
        assert row is not None
        row.first_started_at = row.started_at = first - 3600
    store.requeue(job.id, 1, "host-2 lost")
    second = store.claim(job.id, 1, "host-3", "started")
    assert second.first_started_at == first - 3600 and (second.started_at or 0) >= first
    store.requeue(job.id, 2, "host-3 lost")
    store.claim(job.id, 2, "host-4", "started")
    store.unclaim(job.id, 3, "host-4 refused it")  # a later attempt: the life goes on
    assert store.job(job.id).first_started_at == first - 3600


def test_concurrent_claims_let_exactly_one_win(store: JobStore) -> None:
    job = add_job(store)
    store.queue(job.id, "queued")
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        try:
            store.claim(job.id, 0, "run-x", "claimed")
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


def test_an_attempts_estimated_finish_is_stored_with_its_steps_and_not_kept_by_the_next(
    store: JobStore,
) -> None:
    job = add_job(store)
    store.queue(job.id, "queued")
    store.claim(job.id, 0, "host-1", "started")
    steps = [{"type": "metrics", "message": "step 1", "data": {"step": 1}}]
    assert store.record_run_events(job.id, 1, steps, cursor=1, estimated_finish=2_000_000_000)
    assert store.job(job.id).estimated_finish == 2_000_000_000
    assert store.record_run_events(job.id, 1, [], cursor=1)  # no step: the estimate stays
    assert store.job(job.id).estimated_finish == 2_000_000_000
    store.requeue(job.id, 1, "host-1 lost")
    assert store.claim(job.id, 1, "host-2", "started").estimated_finish is None


def test_two_schedulers_storing_the_same_run_events_store_them_once(store: JobStore) -> None:
    job = add_job(store)
    events = [{"type": "metrics", "message": "step 1", "data": {"step": 1}}]
    assert store.record_run_events(job.id, 0, events, cursor=1)
    assert not store.record_run_events(job.id, 0, events, cursor=1)  # the slower one
    assert [e.message for e in store.events_since(job.id, 0)] == ["Created", "step 1"]


def add_job_with_metadata(store: JobStore, metadata: dict[str, str], tenant: str = "t1") -> JobRow:
    return store.add_job(job_row(tenant=tenant, user_metadata=metadata), "Created")


def selects_on_jobs(store: JobStore) -> list[str]:
    """Every SELECT on the jobs table the engine sends from now on."""
    seen: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            seen.append(statement)

    return seen


def test_a_metadata_filter_and_its_limit_are_applied_in_sql(store: JobStore) -> None:
    wanted = [add_job_with_metadata(store, {"team": "a", "run": str(i)}).id for i in range(4)]
    for i in range(6):
        add_job_with_metadata(store, {"team": "b", "run": str(i)})
    add_job_with_metadata(store, {"team": "a"}, tenant="t2")
    add_job(store)  # no metadata at all
    page, has_more = store.list_jobs("t1", after=None, limit=2, metadata={"team": "a"})
    assert [r.id for r in page] == [wanted[3], wanted[2]] and has_more
    # One statement, run on the driver's cursor (no engine event sees it), holds the filter
    # and the LIMIT.
    where = store.reads.page_statement(filters=1, after=False).sql.upper().split("WHERE", 1)[1]
    assert "LIMIT" in where and ("JSON_EXTRACT" in where or "->>" in where)
    page, has_more = store.list_jobs("t1", None, 10, metadata={"team": "a", "run": "1"})
    assert [r.id for r in page] == [wanted[1]] and not has_more
    assert store.list_jobs("t1", None, 10, metadata={"team": "c"}) == ([], False)


def test_fine_tuned_models_are_selected_for_the_tenant_in_sql(store: JobStore) -> None:
    mine = add_job(store)
    theirs = add_job(store, tenant="t2")
    unfinished = add_job(store)
    for job in (mine, theirs):
        store.queue(job.id, "q")
        store.claim(job.id, 0, "run-1", "s")
        store.succeed(job.id, 1, f"ft:tiny::{job.id}", "done")
    store.queue(unfinished.id, "q")
    statements = selects_on_jobs(store)
    assert [j.id for j in store.fine_tuned_models("t1")] == [mine.id]
    assert len(statements) == 1 and "tenant" in statements[0] and "status" in statements[0]


def test_the_read_path_reads_columns_not_orm_objects(store: JobStore) -> None:
    """GET job and list read plain columns (no ORM instance is built), labelled so a row
    reads like a JobRow, JSON fields decoded; the scheduler's `job` still gets a JobRow."""
    job = add_job_with_metadata(store, {"team": "a"})
    other_tenant = add_job_with_metadata(store, {"team": "a"}, tenant="t2")
    loaded: list[Any] = []
    listener = lambda target, _context: loaded.append(target)  # noqa: E731
    event.listen(JobRow, "load", listener)
    try:
        page, _ = store.list_jobs("t1", None, 10)
        fields = store.get_job_fields("t1", job.id)
        with pytest.raises(NotFound):
            store.get_job_fields("t1", other_tenant.id)
        assert loaded == []
        assert [r.id for r in page] == [job.id]
        assert (fields.id, fields.user_metadata) == (job.id, {"team": "a"})
        assert fields.settings == JobSettings()
        assert fields.status == JobStatus.VALIDATING_FILES.value
        assert isinstance(store.job(job.id), JobRow) and len(loaded) == 1
    finally:
        event.remove(JobRow, "load", listener)
