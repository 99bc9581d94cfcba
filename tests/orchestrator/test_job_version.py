"""jobs.version (migration 0008): every UPDATE of a job row raises it, whoever writes, on
SQLite and PostgreSQL. The API's cache of job bodies is keyed on (id, version), so a write
that left the version alone would let a list serve a stale job: these tests are that fence."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from orchestrator.db import make_engine, migrate
from orchestrator.store import JobStore
from tests.conftest import job_row


@pytest.fixture()
def store(database_url: str) -> JobStore:
    engine = make_engine(database_url)
    migrate(engine)
    return JobStore(engine)


def version_of(store: JobStore, job_id: str) -> int:
    return store.get_job_fields("t1", job_id).version  # type: ignore[no-any-return]


def test_every_write_to_a_job_raises_its_version(store: JobStore) -> None:
    job = store.add_job(job_row(), "Created")
    seen = [version_of(store, job.id)]
    assert seen == [0]
    store.queue(job.id, "Queued")  # the store's own named operations
    seen.append(version_of(store, job.id))
    store.claim(job.id, 0, "run-1", "Claimed")
    seen.append(version_of(store, job.id))
    with store.engine.begin() as connection:  # a raw UPDATE, as an operator might run
        connection.execute(text("UPDATE jobs SET suffix = 'x' WHERE id = :id"), {"id": job.id})
    seen.append(version_of(store, job.id))
    with store.engine.begin() as connection:  # two writes in one transaction
        for suffix in ("y", "z"):
            connection.execute(
                text("UPDATE jobs SET suffix = :s WHERE id = :id"), {"s": suffix, "id": job.id}
            )
    seen.append(version_of(store, job.id))
    assert seen == sorted(set(seen)), seen  # strictly rising
    assert seen[-1] - seen[-2] == 2
    # Only the written row moves.
    other = store.add_job(job_row(), "Created")
    store.request_cancel(job.id)
    assert version_of(store, job.id) > seen[-1] and version_of(store, other.id) == 0


def test_a_page_of_versions_is_the_page_of_jobs(store: JobStore) -> None:
    ids = [store.add_job(job_row(created_at=i, user_metadata={"n": str(i % 2)}), "C").id
           for i in range(5)]  # fmt: skip
    store.queue(ids[3], "Queued")
    for after, limit, metadata in ((None, 2, None), (ids[3], 10, None), (None, 10, {"n": "1"})):
        rows, more = store.list_jobs("t1", after, limit, metadata)
        keys, more_keys = store.list_job_versions("t1", after, limit, metadata)
        assert keys == [(r.id, r.version) for r in rows] and more_keys == more
    assert dict(store.list_job_versions("t1", None, 10)[0])[ids[3]] == 1
