"""Tinker sampling sessions (issue 21): a row of `tinker_models` in the state `sampler`, id
`{session_id}:sample:{seq}`, saying what its `sample` requests sample from (a base, or the
adapter a `tinker://…` path names). The dispatcher never hands such a row to a pack host
(it looks at `pending` and `live` models only); its requests are `sample` rows.

A sampling session lives as long as its Tinker session: once that ends (`finish`, a missed
heartbeat) the row turns `sampler_ended`, what it still had queued fails, a later request
for it is a 400 naming it, and the base's sampler drops its weights from its cache
(orchestrator.tinker.sampling), unless a live sampling session still samples them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.tinker.rows import TinkerModelRow, TinkerSessionRow
from orchestrator.tinker.store import SessionEnded, TinkerStore

SAMPLER, SAMPLER_ENDED = "sampler", "sampler_ended"


@dataclass(frozen=True)
class EndedSamplers:
    """Sampling sessions just ended, and what their bases' samplers may drop."""

    ids: list[str]
    releases: dict[str, list[str]]  # base model -> adapter prefixes no live session uses


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
    if row is not None and row.state == SAMPLER_ENDED:
        raise InvalidRequest(
            f"sampling session {sampler_id} ended with its session: its weights are released; "
            "create a new sampling client",
            "sampling_session_id",
        )
    if row is None or row.state != SAMPLER:
        raise NotFound("sampler", sampler_id, param="sampling_session_id")
    return row


def end_samplers(store: TinkerStore) -> EndedSamplers:
    """Ends the sampling sessions whose Tinker session ended (module docstring)."""
    with store.sessions.begin() as session:
        ended = list(
            session.scalars(
                select(TinkerModelRow)
                .join(TinkerSessionRow, TinkerSessionRow.id == TinkerModelRow.session_id)
                .where(TinkerModelRow.state == SAMPLER, TinkerSessionRow.ended_at.is_not(None))
            )
        )
        for row in ended:
            row.state = SAMPLER_ENDED
        live = set(session.scalars(select(TinkerModelRow).where(TinkerModelRow.state == SAMPLER)))
    return EndedSamplers([row.id for row in ended], releasable(ended, list(live)))


def releasable(ended: list[TinkerModelRow], live: list[TinkerModelRow]) -> dict[str, list[str]]:
    """Base -> the ended sessions' adapter prefixes that no live session samples (pure)."""
    used = {(row.base_model, row.lora.get("adapter_prefix")) for row in live}
    releases: dict[str, set[str]] = {}
    for row in ended:
        prefix = row.lora.get("adapter_prefix")
        if prefix is not None and (row.base_model, prefix) not in used:
            releases.setdefault(row.base_model, set()).add(prefix)
    return {base: sorted(prefixes) for base, prefixes in sorted(releases.items())}
