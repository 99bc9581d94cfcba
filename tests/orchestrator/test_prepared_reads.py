"""The API's job reads on the driver's cursor (orchestrator/store/prepared.py): the same
values as the ORM on SQLite and PostgreSQL, driver errors wrapped as SQLAlchemy wraps them
(so the API still answers 503 when the database is away), connections handed back."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import DBAPIError, OperationalError

from api.app import create_app
from core.job_settings import JobSettings
from orchestrator.db import make_engine, migrate
from orchestrator.errors import NotFound
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.store.job_reads import read_json
from orchestrator.store.prepared import read_cursor
from orchestrator.tables import JobRow
from tests.conftest import job_row
from tests.orchestrator.test_database_outage import (  # noqa: F401 (a fixture)
    own_postgres,
    start_again,
    stop_immediately,
)
from tests.services import postgres as postgres_service

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    # Lone surrogates too (json.dumps escapes them, pydantic-core refuses them).
    | st.text(st.characters(exclude_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(value=json_values, ascii_only=st.booleans())
@example(value={"lone": "\ud800"}, ascii_only=True)
def test_read_json_decodes_what_json_dumps_wrote_as_json_loads_does(
    value: Any, ascii_only: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    # Written back out: NaN, -0.0, 1 against 1.0 and key order all show in the text.
    assert json.dumps(read_json(text)) == json.dumps(json.loads(text))


SETTINGS = {
    "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
    "lora": {},
    "training": {},
    "resources": {},
}


@pytest.fixture()
def store(database_url: str) -> JobStore:
    engine = make_engine(database_url)
    migrate(engine)
    return JobStore(engine)


def plain(value: Any) -> Any:
    """A column's value as JSON can write it (typed settings as they are stored)."""
    return value.to_stored() if isinstance(value, JobSettings) else value


def test_a_job_read_as_columns_equals_the_orm_row(store: JobStore) -> None:
    settings = {
        "version": 2,
        "lora": {"alpha": 1e-05, "target_modules": ["q_proj", "é 😀"]},
        "training": {"learning_rate": 0.0002, "weight_decay": -0.0, "max_seq_len": 2**70},
        "resources": {"use_gpu": None},
    }
    rows = [
        job_row(settings=settings, user_metadata={"ключ": 'значение "\\\n'}, priority=3),
        job_row(settings={}, status="failed", error_code="oom", finished_at=9, max_runtime=60),
        job_row(tenant="t2"),
    ]
    for row in rows:
        store.add_job(row, "Created")
    for row in rows[:2]:
        fields = store.get_job_fields("t1", row.id)
        orm = store.job(row.id)
        for column in JobRow.__mapper__.column_attrs:
            assert json.dumps(plain(getattr(fields, column.key))) == json.dumps(
                plain(getattr(orm, column.key))
            ), column.key
    page, has_more = store.list_jobs("t1", None, 1)
    assert [r.id for r in page] == [rows[1].id] and has_more
    assert page[0] == store.get_job_fields("t1", rows[1].id)
    assert store.list_jobs("t1", rows[1].id, 5) == ([store.get_job_fields("t1", rows[0].id)], False)
    with pytest.raises(NotFound):
        store.get_job_fields("t1", rows[2].id)  # another tenant's job
    with pytest.raises(NotFound):
        store.list_jobs("t1", rows[2].id, 5)  # nor paged after
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_driver_error_leaves_as_sqlalchemys_and_hands_the_connection_back(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # never migrated: no tables
    store = JobStore(engine)
    with pytest.raises(OperationalError, match="no such table"):
        store.get_job_fields("t1", "ftjob-x")
    with pytest.raises(OperationalError, match="no such table"):
        store.list_jobs("t1", "ftjob-x", 5)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.faults
def test_job_reads_answer_503_while_postgres_is_away_and_work_again_after(
    own_postgres: postgres_service.Postgres,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    url = own_postgres.create_database("reads")
    # Acknowledged means durable (the test server's default could lose the job to the stop).
    own_postgres.psql("ALTER DATABASE reads SET synchronous_commit = on")
    store = JobStore(make_engine(url))
    migrate(store.engine)
    job = store.add_job(job_row(tenant="default", settings=SETTINGS), "Created")
    with TestClient(create_app(Settings(data_dir=tmp_path, database_url=url))) as client:
        paths = ["/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job.id}"]
        assert client.get(paths[0]).status_code == 200  # the pool holds a live connection
        stop_immediately(own_postgres)
        for path in paths:
            response = client.get(path)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "service_unavailable"
        start_again(own_postgres)
        assert client.get(paths[0]).json()["data"][0]["id"] == job.id


def test_a_connection_lost_mid_read_is_invalidated_not_pooled_again(
    postgres: postgres_service.Postgres,
) -> None:
    engine = make_engine(postgres.create_database(f"t_{secrets.token_hex(6)}"))
    migrate(engine)
    store = JobStore(engine)
    job = store.add_job(job_row(settings=SETTINGS), "Created")
    with pytest.raises(DBAPIError) as raised, read_cursor(engine) as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        postgres.psql(f"SELECT pg_terminate_backend({pid})")
        cursor.execute("SELECT 1")
    assert raised.value.connection_invalidated
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert store.get_job_fields("t1", job.id).id == job.id  # on a new connection
