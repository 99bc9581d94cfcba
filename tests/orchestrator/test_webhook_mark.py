"""A webhook registered while a job's end is still being committed (PostgreSQL) never loses
that job: registration waits for event transactions in flight, so a job is announced exactly
when its end committed after the registration took its mark."""

from __future__ import annotations

import threading

from sqlalchemy import update

from orchestrator.db import make_engine, migrate
from orchestrator.store import JobStore
from orchestrator.store.rows import add_events, event_row, now
from orchestrator.store.webhooks import WebhookDeliveryRow, WebhookStore
from orchestrator.tables import JobRow
from tests.conftest import job_row
from tests.services.postgres import Postgres


def test_a_job_ending_while_a_webhook_registers_is_not_lost(postgres: Postgres) -> None:
    engine = make_engine(postgres.create_database("webhook_mark"))
    migrate(engine)
    store, webhooks = JobStore(engine), WebhookStore(engine)
    slow = store.add_job(job_row(tenant="acme"), "Created")
    other = store.add_job(job_row(tenant="acme"), "Created")
    inserted, release, committed = threading.Event(), threading.Event(), threading.Event()

    def end_slowly() -> None:
        """Ends `slow` in a transaction that stays open until released."""
        with store.sessions.begin() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == slow.id)
                .values(status="cancelled", finished_at=now())
            )
            add_events(session, slow.id, [event_row(slow.id, "Job cancelled")])
            inserted.set()
            release.wait(30)
        committed.set()

    ending = threading.Thread(target=end_slowly)
    ending.start()
    assert inserted.wait(30)
    store.cancel(other.id)  # a later event, committed first

    returned_before_commit: list[bool] = []

    def register() -> None:
        webhooks.add_endpoint("acme", "https://hooks.example.com/x", max_per_tenant=5)
        returned_before_commit.append(not committed.is_set())

    registering = threading.Thread(target=register)
    registering.start()
    registering.join(timeout=1.0)  # without the lock it returns here, before the commit
    release.set()
    ending.join(timeout=30)
    registering.join(timeout=30)

    webhooks.enqueue_ended_jobs()
    with store.sessions() as session:
        announced = {d.job_id for d in session.query(WebhookDeliveryRow)}
    # Announced exactly when its end committed after the registration's mark.
    assert (slow.id in announced) == returned_before_commit[0]
    assert returned_before_commit == [False]  # the registration waited for it
