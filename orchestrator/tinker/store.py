"""The one writer of the Tinker API's rows (orchestrator.tinker.rows): the API adds sessions,
models and requests; the dispatcher moves requests along and writes their results. A new
request wakes the dispatcher and an answer its `retrieve_future` as they commit
(orchestrator.store.changes: in this process directly, other processes by NOTIFY)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.store import new_id
from orchestrator.store.changes import (
    EVERY_JOB,
    TINKER_ANSWERS_CHANNEL,
    TINKER_REQUESTS_CHANNEL,
    Changes,
    notify,
)
from orchestrator.tinker.rows import (
    DONE,
    FAILED,
    MODEL_ENDING,
    MODEL_LIVE,
    MODEL_PENDING,
    PENDING,
    SAMPLE,
    SENT,
    TinkerModelRow,
    TinkerRequestRow,
    TinkerSessionRow,
)
from orchestrator.usage import Usage, add_usage, usage_of_answer


def model_id_for(session_id: str, model_seq_id: int) -> str:
    """The id the SDK assumes (`create_training_client_from_state` builds it itself)."""
    return f"{session_id}:train:{model_seq_id}"


def summed(usages: list[Usage]) -> Usage:
    """One day's usages as one (a batch of answers is counted at one moment)."""
    tokens: dict[str, int] = {}
    for usage in usages:
        for kind, n in usage.tokens.items():
            tokens[kind] = tokens.get(kind, 0) + n
    return Usage(usages[0].day, tokens, sum(u.device_seconds for u in usages))


class SessionEnded(Exception):
    """The session is over (finished, or a missed heartbeat): the SDK hears 410."""


class TinkerStore:
    def __init__(self, engine: Engine, changes: Changes | None = None) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.changes = changes or Changes()  # a store of its own: nobody else hears it

    def _answered(self, session: Session, request_ids: list[str]) -> None:
        """In the answering transaction: its futures hear of it once it commits."""
        for request_id in request_ids:
            notify(session, TINKER_ANSWERS_CHANNEL, request_id)

    def _say_answered(self, request_ids: list[str]) -> None:
        self.changes.tinker_answers(request_ids)

    # ---- the API's writes ------------------------------------------------------------------
    def create_session(self, tenant: str) -> str:
        stamp = time.time()
        row = TinkerSessionRow(
            id=new_id("tsess"), tenant=tenant, created_at=stamp, heartbeat_at=stamp
        )
        with self.sessions.begin() as session:
            session.add(row)
        return row.id

    def session(self, tenant: str, session_id: str) -> TinkerSessionRow:
        with self.sessions() as session:
            row = session.get(TinkerSessionRow, session_id)
        if row is None or row.tenant != tenant:
            raise NotFound("session", session_id, param="session_id")
        return row

    def heartbeat(self, tenant: str, session_id: str) -> None:
        row = self.session(tenant, session_id)
        if row.ended_at is not None:
            raise SessionEnded(f"session {session_id} ended ({row.end_reason})")
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerSessionRow)
                .where(TinkerSessionRow.id == session_id)
                .values(heartbeat_at=time.time())
            )

    def create_model(
        self,
        tenant: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora: dict[str, Any],
        first: tuple[str, dict[str, Any]] | None = None,
    ) -> TinkerRequestRow:
        """The model's row and its creation request (seq_id 0; `first`: another request
        that creates it, a load of saved weights); a retry finds both."""
        live = self.session(tenant, session_id)
        if live.ended_at is not None:
            raise SessionEnded(f"session {session_id} ended ({live.end_reason})")
        model_id = model_id_for(session_id, model_seq_id)
        with self.sessions.begin() as session:
            if session.get(TinkerModelRow, model_id) is None:
                session.add(
                    TinkerModelRow(
                        id=model_id,
                        tenant=tenant,
                        session_id=session_id,
                        base_model=base_model,
                        lora=lora,
                        state=MODEL_PENDING,
                        created_at=time.time(),
                    )
                )
        kind, payload = first or ("create_model", {"base_model": base_model, "lora": lora})
        return self.add_request(tenant, model_id, 0, kind, payload)

    def model(self, tenant: str, model_id: str) -> TinkerModelRow:
        with self.sessions() as session:
            row = session.get(TinkerModelRow, model_id)
        if row is None or row.tenant != tenant:
            raise NotFound("model", model_id, param="model_id")
        return row

    def add_live_request(
        self, tenant: str, model_id: str, seq_id: int, kind: str, payload: dict[str, Any]
    ) -> TinkerRequestRow:
        """`add_request` for a model that must be pending or live (the API's hot path: one
        call, where a model read and a write were two)."""
        model = self.model(tenant, model_id)
        if model.state not in (MODEL_PENDING, MODEL_LIVE):
            raise InvalidRequest(
                f"model_id: model {model_id} is {model.state}"
                + (f" ({model.error})" if model.error else ""),
                "model_id",
            )
        return self.add_request(tenant, model_id, seq_id, kind, payload)

    def add_request(
        self, tenant: str, model_id: str, seq_id: int, kind: str, payload: dict[str, Any]
    ) -> TinkerRequestRow:
        """Writes the request; a retry with the same (model_id, seq_id) gets the first row."""
        row = TinkerRequestRow(
            id=new_id("treq"),
            tenant=tenant,
            model_id=model_id,
            seq_id=seq_id,
            kind=kind,
            payload=payload,
            state=PENDING,
            created_at=time.time(),
        )
        try:
            with self.sessions.begin() as session:
                session.add(row)
                notify(session, TINKER_REQUESTS_CHANNEL, "")
            self.changes.new_tinker_requests()
            return row
        except IntegrityError:
            with self.sessions() as session:
                first = session.scalar(
                    select(TinkerRequestRow).where(
                        TinkerRequestRow.model_id == model_id, TinkerRequestRow.seq_id == seq_id
                    )
                )
            if first is None or first.tenant != tenant:
                raise
            return first

    def request(self, tenant: str, request_id: str) -> TinkerRequestRow:
        with self.sessions() as session:
            row = session.get(TinkerRequestRow, request_id)
        if row is None or row.tenant != tenant:
            raise NotFound("future", request_id, param="request_id")
        return row

    # ---- the dispatcher's ------------------------------------------------------------------
    def pending_requests(self) -> list[TinkerRequestRow]:
        """Pending requests for pack hosts (sampling requests go to samplers instead)."""
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(TinkerRequestRow)
                    .where(TinkerRequestRow.state == PENDING, TinkerRequestRow.kind != SAMPLE)
                    .order_by(TinkerRequestRow.model_id, TinkerRequestRow.seq_id)
                )
            )

    def pending_samples(self) -> list[TinkerRequestRow]:
        """Pending sampling requests (orchestrator.tinker.sampling), oldest first."""
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(TinkerRequestRow)
                    .where(TinkerRequestRow.state == PENDING, TinkerRequestRow.kind == SAMPLE)
                    .order_by(TinkerRequestRow.created_at)
                )
            )

    def last_handed_seq(self, model_id: str) -> int:
        """The highest seq_id of the model already handed to its host (or answered)."""
        return self.last_handed_seqs([model_id])[model_id]

    def last_handed_seqs(self, model_ids: list[str]) -> dict[str, int]:
        """`last_handed_seq` of each model, in one query (a dispatcher pass asks for all)."""
        with self.sessions() as session:
            found = session.execute(
                select(TinkerRequestRow.model_id, func.max(TinkerRequestRow.seq_id))
                .where(TinkerRequestRow.model_id.in_(model_ids), TinkerRequestRow.state != PENDING)
                .group_by(TinkerRequestRow.model_id)
            ).all()
        last = {model_id: int(seq) for model_id, seq in found if seq is not None}
        return {model_id: last.get(model_id, -1) for model_id in model_ids}

    def models(self, states: tuple[str, ...]) -> list[TinkerModelRow]:
        with self.sessions() as session:
            return list(
                session.scalars(select(TinkerModelRow).where(TinkerModelRow.state.in_(states)))
            )

    def mark_sent(self, request_ids: list[str]) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerRequestRow)
                .where(TinkerRequestRow.id.in_(request_ids), TinkerRequestRow.state == PENDING)
                .values(state=SENT)
            )

    def finish(
        self,
        request_id: str,
        result: dict[str, Any] | None,
        error: str | None,
        usage: dict[str, Any] | None = None,
    ) -> None:
        answer = {"request_id": request_id, "result": result, "error": error, "usage": usage}
        self.finish_many([answer])

    def finish_many(self, answers: list[dict[str, Any]]) -> None:
        """Writes answers ({"request_id", "result", "error"}) in one transaction. An
        answer's "usage" (core.usage: tokens, device-seconds) is added to its tenant's day
        in the same transaction, only as its row leaves pending or sent: an answer written
        again counts nothing more (orchestrator.usage)."""
        if not answers:
            return
        stamp = time.time()
        counted = {
            a["request_id"]: usage
            for a in answers
            if (usage := usage_of_answer(a.get("usage"), stamp)) is not None
        }
        with self.sessions.begin() as session:
            if counted:  # one read of the rows' states, one upsert per tenant: not per row
                before = session.execute(
                    select(TinkerRequestRow.id, TinkerRequestRow.tenant, TinkerRequestRow.state)
                    .where(TinkerRequestRow.id.in_(list(counted)))
                    .with_for_update()
                ).all()
                per_tenant: dict[str, list[Usage]] = {}
                for row in before:
                    if row.state in (PENDING, SENT):
                        per_tenant.setdefault(row.tenant, []).append(counted[row.id])
                for tenant, usages in per_tenant.items():
                    add_usage(session, tenant, [summed(usages)])
            for answer in answers:
                session.execute(
                    update(TinkerRequestRow)
                    .where(
                        TinkerRequestRow.id == answer["request_id"],
                        TinkerRequestRow.state != DONE,
                    )
                    .values(
                        state=FAILED if answer["error"] is not None else DONE,
                        result=answer["result"],
                        error=answer["error"],
                        finished_at=stamp,
                    )
                )
            self._answered(session, [a["request_id"] for a in answers])
        self._say_answered([a["request_id"] for a in answers])

    def fail_pending(self, model_id: str, error: str) -> None:
        """Every request of the model not yet answered fails with `error`."""
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerRequestRow)
                .where(
                    TinkerRequestRow.model_id == model_id,
                    TinkerRequestRow.state.in_((PENDING, SENT)),
                )
                .values(state=FAILED, error=error, finished_at=time.time())
            )
            self._answered(session, [EVERY_JOB])  # which ones: the futures look themselves
        self._say_answered([EVERY_JOB])

    def set_model(
        self, model_id: str, state: str, host_id: str | None = None, error: str | None = None
    ) -> None:
        values: dict[str, Any] = {"state": state, "error": error}
        if host_id is not None:
            values["host_id"] = host_id
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerModelRow).where(TinkerModelRow.id == model_id).values(**values)
            )

    # ---- a model's move to another host (orchestrator.tinker.relocation) ------------------
    def unhost(self, model_id: str) -> None:
        """The model has no host now (its state waits in the store to be restored)."""
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerModelRow).where(TinkerModelRow.id == model_id).values(host_id=None)
            )

    def requeue(self, model_id: str, request_ids: list[str] | None = None) -> None:
        """Handed-over requests of the model (those named, else all) that never ran go back
        to pending: they go again, in seq_id order, to the model's next host."""
        where = [TinkerRequestRow.model_id == model_id, TinkerRequestRow.state == SENT]
        if request_ids is not None:
            where.append(TinkerRequestRow.id.in_(request_ids))
        with self.sessions.begin() as session:
            session.execute(update(TinkerRequestRow).where(*where).values(state=PENDING))

    def model_requests(self, model_id: str) -> list[TinkerRequestRow]:
        """Every request of the model (but sampling), by seq_id."""
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(TinkerRequestRow)
                    .where(TinkerRequestRow.model_id == model_id, TinkerRequestRow.kind != SAMPLE)
                    .order_by(TinkerRequestRow.seq_id)
                )
            )

    def settle_new_model(self, model_id: str, error: str | None) -> None:
        """A pending model's first request answered: it is live, or failed with `error`."""
        values = {"state": MODEL_LIVE} if error is None else {"state": "failed", "error": error}
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerModelRow)
                .where(TinkerModelRow.id == model_id, TinkerModelRow.state == MODEL_PENDING)
                .values(**values)
            )

    def end_quiet_sessions(self, heartbeat_deadline: float) -> None:
        """Ends the sessions whose last heartbeat is older than the deadline."""
        with self.sessions() as session:
            quiet = list(
                session.scalars(
                    select(TinkerSessionRow.id).where(
                        TinkerSessionRow.ended_at.is_(None),
                        TinkerSessionRow.heartbeat_at < heartbeat_deadline,
                    )
                )
            )
        if quiet:
            self._end_sessions(quiet, "missed heartbeat")

    def finish_session(self, tenant: str, session_id: str, reason: str) -> None:
        """The client closed its session (`ServiceClient.close`); a second call is a no-op."""
        if self.session(tenant, session_id).ended_at is None:
            self._end_sessions([session_id], reason[:64] or "finished")

    def _end_sessions(self, session_ids: list[str], reason: str) -> None:
        """Marks the sessions ended and their models `ending`: the dispatcher frees their
        slots and fails what they still had queued."""
        with self.sessions.begin() as session:
            session.execute(
                update(TinkerSessionRow)
                .where(TinkerSessionRow.id.in_(session_ids), TinkerSessionRow.ended_at.is_(None))
                .values(ended_at=time.time(), end_reason=reason)
            )
            session.execute(
                update(TinkerModelRow)
                .where(
                    TinkerModelRow.session_id.in_(session_ids),
                    TinkerModelRow.state.in_((MODEL_PENDING, MODEL_LIVE)),
                )
                .values(state=MODEL_ENDING)
            )


__all__ = ["SessionEnded", "TinkerStore", "model_id_for"]
