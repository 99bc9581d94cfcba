"""Tables of the Tinker API (migration 0013): a session, a model (a request-driven slot on
a pack host) and each request as a row, unique per (model_id, seq_id)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.tables import Base

# A request's life: written by the API, handed to the host, answered.
PENDING, SENT, DONE, FAILED = "pending", "sent", "done", "failed"
# A sampling request (a completion, or Tinker's `sample`) is a row of the same table, of this
# kind, with model_id its owner (`completion:{id}`, or a sampling session) and seq_id 0 (or
# the SDK's seq_id); it goes to the base's sampler, not to a pack host.
SAMPLE = "sample"
# A model's life: waiting for a host, a live slot on one, its session over (its slot still
# to free: `ending`), ended, or failed.
MODEL_PENDING, MODEL_LIVE, MODEL_ENDING, MODEL_ENDED, MODEL_FAILED = (
    "pending",
    "live",
    "ending",
    "ended",
    "failed",
)


class TinkerSessionRow(Base):
    __tablename__ = "tinker_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TinkerModelRow(Base):
    __tablename__ = "tinker_models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # {session}:train:{seq}
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)  # rank, seed, train_* flags
    state: Mapped[str] = mapped_column(String(16))
    host_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class TinkerRequestRow(Base):
    __tablename__ = "tinker_requests"
    __table_args__ = (UniqueConstraint("model_id", "seq_id", name="uq_tinker_requests_model_seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(128))
    seq_id: Mapped[int] = mapped_column(Integer)  # 0: the model's creation
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
