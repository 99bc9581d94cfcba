"""Tinker sampling sessions (issue 21): a row of `tinker_models` in the state `sampler`, id
`{session_id}:sample:{seq}`, saying what its `sample` requests sample from (a base, or the
adapter a `tinker://…` path names). The dispatcher never hands such a row to a pack host
(it looks at `pending` and `live` models only); its requests are `sample` rows."""

from __future__ import annotations

import time

from orchestrator.errors import NotFound
from orchestrator.tinker.rows import TinkerModelRow
from orchestrator.tinker.store import SessionEnded, TinkerStore

SAMPLER = "sampler"


def sampler_id_for(session_id: str, seq: int) -> str:
    return f"{session_id}:sample:{seq}"


def create_sampler(
    store: TinkerStore,
    tenant: str,
    session_id: str,
    seq: int,
    base_model: str,
    model_path: str | None,
    adapter_prefix: str | None,
) -> TinkerModelRow:
    """The sampling session; a retry (same session and seq) finds the first one."""
    live = store.session(tenant, session_id)
    if live.ended_at is not None:
        raise SessionEnded(f"session {session_id} ended ({live.end_reason})")
    row = TinkerModelRow(
        id=sampler_id_for(session_id, seq),
        tenant=tenant,
        session_id=session_id,
        base_model=base_model,
        lora={"model_path": model_path, "adapter_prefix": adapter_prefix},
        state=SAMPLER,
        created_at=time.time(),
    )
    with store.sessions.begin() as session:
        found = session.get(TinkerModelRow, row.id)
        if found is None:
            session.add(row)
    return found or row


def sampler(store: TinkerStore, tenant: str, sampler_id: str) -> TinkerModelRow:
    try:
        row = store.model(tenant, sampler_id)
    except NotFound:
        row = None
    if row is None or row.state != SAMPLER:
        raise NotFound("sampler", sampler_id, param="sampling_session_id")
    return row
