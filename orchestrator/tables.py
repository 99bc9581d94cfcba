"""Database tables (SQLAlchemy 2): uploaded files, fine-tuning jobs, and their events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates
from sqlalchemy.types import TypeDecorator

from core.job_settings import JobSettings


class JobSettingsJSON(TypeDecorator[JobSettings]):
    """A job's typed settings, stored as JSON with their version (core/job_settings.py)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else JobSettings.stored(value).to_stored()

    def process_result_value(self, value: Any, dialect: Dialect) -> JobSettings | None:
        return None if value is None else JobSettings.stored(value)


class Base(DeclarativeBase):
    pass


class FileRow(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(32))
    examples: Mapped[int] = mapped_column(Integer)


class JobRow(Base):
    __tablename__ = "jobs"
    # A list page walks this index newest first and stops after limit + 1 rows.
    __table_args__ = (Index("ix_jobs_tenant_newest", "tenant", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)  # the current attempt's start
    # The first attempt's start: `max_runtime` counts from here, across attempts (0009).
    first_started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(128))
    # The job's resolved settings (core/job_settings.py), read as attributes.
    settings: Mapped[JobSettings] = mapped_column(JobSettingsJSON)
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    # The run (a pack of jobs on Ray) of the job's current attempt.
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # How many of its run's events were already stored: a restarted scheduler resumes here.
    event_cursor: Mapped[int] = mapped_column(Integer, default=0)
    # Admission order among waiting jobs: higher first (then fair across tenants).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Seconds the job may run before it fails with `timeout`; None: no limit.
    max_runtime: Mapped[int | None] = mapped_column(Integer)
    # When the running job should end, from its measured time per step (migration 0014;
    # orchestrator/scheduling/finish_estimate.py); the job object shows it while it runs.
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    # Hosts lost with their preempted node (migration 0017): each cost the job one of its
    # `max_preemptions_per_job`, never an attempt (orchestrator/scheduling/host_watch.py).
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Raised by a trigger on every UPDATE of the row (migration 0008), never written here:
    # the API's cache of response bodies is keyed on (id, version).
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The files a job left when it ended (its results CSV), set with its terminal status (0015).
    result_files: Mapped[list[str] | None] = mapped_column(JSON)
    # When its fine-tuned model was deleted (DELETE /v1/models/…): the job stays, its stored
    # adapter, checkpoints and merged weights are gone, and its downloads answer 404.
    model_deleted_at: Mapped[int | None] = mapped_column(BigInteger)

    @validates("settings")
    def _typed_settings(self, _key: str, value: JobSettings | dict[str, Any]) -> JobSettings:
        return JobSettings.stored(value)


class JobEventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("uq_job_events_job_seq", "job_id", "job_seq", unique=True),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    # 1, 2, 3 … per job, taken under the job's row lock (store/rows.py add_events), so they
    # commit in order: readers of one job page and stream by it, never by `seq`.
    job_seq: Mapped[int] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class MergeRow(Base):
    """A request for a job's adapter (or one of its checkpoints) merged into its base at one
    scale: the API adds it, the scheduler runs it as a Ray task and says how it ended."""

    __tablename__ = "merges"
    __table_args__ = (UniqueConstraint("job_id", "checkpoint", "scale", name="uq_merge_per_scale"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    checkpoint: Mapped[str] = mapped_column(String(64))  # "final" or "step-{n}"
    scale: Mapped[str] = mapped_column(String(32))  # canonical text (core/merged_files.py)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued running succeeded failed
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    # Raised by the scheduler running it each tick: a merge whose scheduler went away is
    # queued again by another once this is old (orchestrator/merges.py).
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)


class ApiKeyRow(Base):
    """An API key, stored as its sha256 only: keys are long random tokens, so a fast hash
    is enough (nothing to brute-force), and a leaked table reveals no usable key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class IdempotencyRow(Base):
    """The first response to a request sent with an Idempotency-Key, replayed to retries."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)
