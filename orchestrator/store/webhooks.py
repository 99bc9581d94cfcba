"""Webhook endpoints and deliveries in the database (part of the store, the one DB writer):
the only code that reads or writes them.

A delivery is one job's end announced to one endpoint; it is created once (unique per
endpoint and job), claimed by a guarded update before each attempt (so two delivery
workers never POST the same attempt), and ends `succeeded` or `failed`. What a tenant reads
of an attempt is its status class (2xx … 5xx, or `unreachable`), never what the network said.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Collection
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from orchestrator.errors import NotFound, RateLimited
from orchestrator.states import JobStatus
from orchestrator.store.rows import new_id, now
from orchestrator.tables import Base, JobEventRow, JobRow

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
UNREACHABLE = "unreachable"  # refused address, no answer, or no answer within the deadline
OUTCOME_TEXT = {
    UNREACHABLE: "the receiver could not be reached, or did not answer within the deadline",
    "1xx": "the receiver answered 1xx",
    "3xx": "the receiver answered a redirect (not followed)",
    "4xx": "the receiver answered 4xx",
    "5xx": "the receiver answered 5xx",
}
ENDED = [s.value for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)]


class WebhookEndpointRow(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    # Standard Webhooks' "whsec_" + base64 of the key; the receiver needs it to verify.
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # Jobs whose last event comes after this one are announced: an exact boundary, where
    # whole-second timestamps would announce a job that ended in the registering second.
    after_event_seq: Mapped[int] = mapped_column(Integer)


class WebhookDeliveryRow(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "job_id", name="uq_webhook_delivery_per_job"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    tenant: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_class: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)


def job_ended_payload(delivery_id: str, job: JobRow) -> dict[str, Any]:
    """The event body, shaped like OpenAI's fine-tuning webhooks."""
    return {
        "id": delivery_id,
        "object": "event",
        "type": f"fine_tuning.job.{job.status}",
        "created_at": job.finished_at or now(),
        "data": {
            "id": job.id,
            "status": job.status,
            "model": job.model,
            "fine_tuned_model": job.fine_tuned_model,
            "error": {"code": job.error_code, "message": job.error_message}
            if job.error_code
            else None,
        },
    }


class WebhookStore:
    def __init__(self, engine: Engine) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    # ---- endpoints (per tenant) ----
    def add_endpoint(self, tenant: str, url: str, max_per_tenant: int) -> WebhookEndpointRow:
        """Registers `url`; RateLimited when the tenant has `max_per_tenant` already.

        The mark is the newest event once every event transaction in flight has committed
        (on PostgreSQL a SHARE lock waits for them and holds new ones back for this short
        transaction): an event committed after the mark always numbers above it, so no job
        ending around registration is missed. SQLite writes one transaction at a time.
        The cap is checked in the same transaction, under a lock per tenant.
        """
        row = WebhookEndpointRow(
            id=new_id("whep"),
            tenant=tenant,
            url=url,
            secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
            created_at=now(),
            after_event_seq=0,
        )
        with self.sessions.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                # One registration per tenant at a time, so two cannot pass the cap together.
                tenant_lock = func.pg_advisory_xact_lock(func.hashtext("webhooks:" + tenant))
                session.execute(select(tenant_lock))
                session.execute(text("LOCK TABLE job_events IN SHARE MODE"))
            # SQLite: the INSERT comes first and takes the one write lock, so the count and
            # the mark after it see every other writer's rows, committed.
            session.add(row)
            session.flush()
            count = select(func.count()).where(WebhookEndpointRow.tenant == tenant)
            if (session.scalar(count) or 0) > max_per_tenant:
                raise RateLimited(
                    f"a tenant may have {max_per_tenant} webhook endpoints; delete one first",
                    param="url",
                )
            row.after_event_seq = session.scalar(select(func.max(JobEventRow.seq))) or 0
        return row

    def get_endpoint(self, tenant: str, endpoint_id: str) -> WebhookEndpointRow:
        with self.sessions() as session:
            row = session.get(WebhookEndpointRow, endpoint_id)
        if row is None or row.tenant != tenant:
            raise NotFound("webhook", endpoint_id)
        return row

    def list_endpoints(self, tenant: str) -> list[WebhookEndpointRow]:
        query = select(WebhookEndpointRow).where(WebhookEndpointRow.tenant == tenant)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(WebhookEndpointRow.id)))

    def delete_endpoint(self, tenant: str, endpoint_id: str) -> WebhookEndpointRow:
        row = self.get_endpoint(tenant, endpoint_id)
        with self.sessions.begin() as session:
            session.execute(
                delete(WebhookDeliveryRow).where(WebhookDeliveryRow.endpoint_id == endpoint_id)
            )
            session.execute(delete(WebhookEndpointRow).where(WebhookEndpointRow.id == endpoint_id))
        return row

    def list_deliveries(self, tenant: str, endpoint_id: str) -> list[WebhookDeliveryRow]:
        self.get_endpoint(tenant, endpoint_id)
        query = select(WebhookDeliveryRow).where(WebhookDeliveryRow.endpoint_id == endpoint_id)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(WebhookDeliveryRow.id.desc())))

    # ---- the delivery worker's side ----
    def enqueue_ended_jobs(self) -> int:
        """Creates a delivery for each job that ended since its tenant's endpoint was
        registered and has none yet; returns how many were created."""
        created = 0
        with self.sessions() as session:
            endpoints = list(session.scalars(select(WebhookEndpointRow)))
            for endpoint in endpoints:
                announced = select(WebhookDeliveryRow.job_id).where(
                    WebhookDeliveryRow.endpoint_id == endpoint.id
                )
                # A terminal job never changes again: any event of it after the mark means
                # its end (its last event) came after the mark too.
                ended_since = select(JobEventRow.job_id).where(
                    JobEventRow.seq > endpoint.after_event_seq
                )
                jobs = session.scalars(
                    select(JobRow).where(
                        JobRow.tenant == endpoint.tenant,
                        JobRow.status.in_(ENDED),
                        JobRow.id.in_(ended_since),
                        JobRow.id.not_in(announced),
                    )
                )
                for job in jobs:
                    created += self._add_delivery(endpoint, job)
        return created

    def _add_delivery(self, endpoint: WebhookEndpointRow, job: JobRow) -> int:
        delivery_id = new_id("msg")
        row = WebhookDeliveryRow(
            id=delivery_id,
            endpoint_id=endpoint.id,
            tenant=endpoint.tenant,
            job_id=job.id,
            event_type=f"fine_tuning.job.{job.status}",
            payload=job_ended_payload(delivery_id, job),
            status=PENDING,
            attempts=0,
            next_attempt_at=time.time(),
            created_at=now(),
        )
        try:
            with self.sessions.begin() as session:
                session.add(row)
        except IntegrityError:  # another delivery worker created it first
            return 0
        return 1

    def due(
        self, limit: int = 20, busy: Collection[str] = ()
    ) -> list[tuple[WebhookDeliveryRow, WebhookEndpointRow]]:
        """Deliveries whose next attempt is due, but for the `busy` endpoints (one in flight
        already): a stuck endpoint's backlog never hides other endpoints' deliveries."""
        query = (
            select(WebhookDeliveryRow, WebhookEndpointRow)
            .join(WebhookEndpointRow, WebhookEndpointRow.id == WebhookDeliveryRow.endpoint_id)
            .where(
                WebhookDeliveryRow.status == PENDING,
                WebhookDeliveryRow.next_attempt_at <= time.time(),
                WebhookDeliveryRow.endpoint_id.not_in(list(busy)),
            )
            .order_by(WebhookDeliveryRow.next_attempt_at)
            .limit(limit)
        )
        with self.sessions() as session:
            return [(d, e) for d, e in session.execute(query).tuples()]

    def claim(self, delivery: WebhookDeliveryRow, lease_s: float) -> bool:
        """Pushes the next attempt past the lease; False when another worker got it first."""
        with self.sessions.begin() as session:
            touched = session.execute(
                update(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.id == delivery.id,
                    WebhookDeliveryRow.status == PENDING,
                    WebhookDeliveryRow.next_attempt_at == delivery.next_attempt_at,
                )
                .values(next_attempt_at=time.time() + lease_s)
            ).rowcount  # type: ignore[attr-defined]
        return bool(touched == 1)

    def record_attempt(
        self,
        delivery_id: str,
        status_code: int | None,
        status_class: str,
        retry_at: float | None,
    ) -> None:
        """One attempt's outcome: delivered (2xx), retried at `retry_at`, or given up."""
        delivered = status_class == "2xx"
        status = SUCCEEDED if delivered else (PENDING if retry_at is not None else FAILED)
        with self.sessions.begin() as session:
            session.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id == delivery_id)
                .values(
                    status=status,
                    attempts=WebhookDeliveryRow.attempts + 1,
                    last_status_code=status_code,
                    last_status_class=status_class,
                    last_error=None if delivered else OUTCOME_TEXT.get(status_class),
                    next_attempt_at=retry_at if retry_at is not None else time.time(),
                    delivered_at=now() if delivered else None,
                )
            )
