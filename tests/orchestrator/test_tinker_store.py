"""The Tinker API's rows (orchestrator.tinker): retries find the first request, tenants see
only their own, requests go to a host in seq_id order, sessions end, hosts are chosen."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from core.host_protocol import HostShape
from orchestrator.db import make_engine, migrate
from orchestrator.errors import NotFound
from orchestrator.tinker.dispatch import host_for, ordered_batch
from orchestrator.tinker.rows import MODEL_ENDING, MODEL_PENDING, SENT, TinkerRequestRow
from orchestrator.tinker.store import SessionEnded, TinkerStore
from orchestrator.usage import UsageStore

LORA = {"rank": 4, "seed": 0, "train_mlp": True, "train_attn": True, "train_unembed": True}


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'lorafleet.db'}")
    migrate(engine)
    return engine


@pytest.fixture()
def store(engine: Engine) -> TinkerStore:
    return TinkerStore(engine)


def test_a_retry_finds_the_first_request_and_tenants_stay_apart(store: TinkerStore) -> None:
    session = store.create_session("t1")
    create = store.create_model("t1", session, 0, "tiny-llama", LORA)
    assert create.model_id == f"{session}:train:0" and create.seq_id == 0
    again = store.create_model("t1", session, 0, "tiny-llama", LORA)
    assert again.id == create.id
    first = store.add_request("t1", create.model_id, 1, "optim_step", {"a": 1})
    retry = store.add_request("t1", create.model_id, 1, "optim_step", {"a": 1})
    assert retry.id == first.id
    with pytest.raises(NotFound):
        store.request("t2", first.id)
    with pytest.raises(NotFound):
        store.model("t2", create.model_id)
    with pytest.raises(NotFound):
        store.heartbeat("t2", session)


def test_requests_go_in_seq_order_and_never_past_a_gap(store: TinkerStore) -> None:
    session = store.create_session("t1")
    model_id = store.create_model("t1", session, 0, "tiny-llama", LORA).model_id
    for seq in (3, 1, 2, 5):  # written out of order; 4 is still on its way
        store.add_request("t1", model_id, seq, "forward_backward", {})
    rows = store.pending_requests()
    assert [r.seq_id for r in rows] == [0, 1, 2, 3, 5]
    batch = ordered_batch(rows, store.last_handed_seq(model_id))
    assert [r.seq_id for r in batch] == [0, 1, 2, 3]
    store.mark_sent([r.id for r in batch])
    assert store.last_handed_seq(model_id) == 3
    assert store.request("t1", batch[0].id).state == SENT
    left = store.pending_requests()
    assert ordered_batch(left, 3) == []  # 5 waits for 4
    store.finish(batch[1].id, {"metrics": {"loss:sum": 1.0}}, None)
    assert store.request("t1", batch[1].id).result == {"metrics": {"loss:sum": 1.0}}


def test_a_quiet_or_finished_session_ends_and_its_models_are_freed(store: TinkerStore) -> None:
    quiet, closed, alive = (store.create_session("t1") for _ in range(3))
    models = [
        store.create_model("t1", s, 0, "tiny-llama", LORA).model_id for s in (quiet, closed, alive)
    ]
    for session in (closed, alive):
        store.heartbeat("t1", session)
    store.finish_session("t1", closed, "finished: success")
    store.end_quiet_sessions(heartbeat_deadline=store.session("t1", closed).heartbeat_at - 1e-6)
    states = [store.model("t1", m).state for m in models]
    assert states == [MODEL_ENDING, MODEL_ENDING, MODEL_PENDING]
    with pytest.raises(SessionEnded):
        store.heartbeat("t1", quiet)
    assert store.session("t1", quiet).end_reason == "missed heartbeat"
    with pytest.raises(SessionEnded):
        store.create_model("t1", closed, 1, "tiny-llama", LORA)
    store.end_quiet_sessions(time.time() - 3600)  # an hour's grace: nobody else ends
    assert store.model("t1", models[2]).state == MODEL_PENDING


def report(base: str, **over: Any) -> dict[str, Any]:
    shape = HostShape(base, "/m", 1, False, "fp32")
    return {
        "alive": True,
        "warm": True,
        "ending": False,
        "exclusive": False,
        "shape": shape,
        **over,
    }


def test_a_model_goes_to_a_warm_live_host_of_its_base() -> None:
    reports: dict[str, Any] = {
        "a": report("other"),
        "b": report("tiny", warm=False),  # would idle-end under a thinking client
        "c": report("tiny", ending=True),
        "d": report("tiny", exclusive=True),
        "e": report("tiny"),
    }
    assert host_for("tiny", reports) == "e"
    assert host_for("none", reports) is None


def test_a_pass_reads_every_models_handed_seq_and_answers_count_once_per_row(
    engine: Engine, store: TinkerStore
) -> None:
    """The dispatcher's batched reads and writes: each model's last handed seq_id in one
    query; a batch of answers (two tenants, one row answered twice, one already answered
    before) adds each row's usage once, to its own tenant."""
    usage = UsageStore(engine)
    rows: dict[str, list[TinkerRequestRow]] = {}
    for tenant in ("acme", "globex"):
        session = store.create_session(tenant)
        model = store.create_model(tenant, session, 0, "tiny-llama", LORA).model_id
        rows[tenant] = [store.add_request(tenant, model, s, "forward_backward", {}) for s in (1, 2)]
    acme, globex = rows["acme"], rows["globex"]
    store.mark_sent([acme[0].id, globex[0].id, globex[1].id])
    seqs = store.last_handed_seqs([acme[0].model_id, globex[0].model_id, "nobody:train:0"])
    assert seqs == {acme[0].model_id: 1, globex[0].model_id: 2, "nobody:train:0": -1}
    used = {"tokens": {"trained": 10}, "device_seconds": 0.25}
    store.finish(globex[1].id, {"outputs": []}, None, used)  # answered before the batch
    store.finish_many(
        [
            {"request_id": r.id, "result": {"outputs": []}, "error": None, "usage": used}
            for r in (acme[0], acme[0], acme[1], globex[0], globex[1])
        ]
    )
    far = (dt.date(2000, 1, 1), dt.date(2100, 1, 1))
    [acme_day] = usage.days("acme", *far)
    [globex_day] = usage.days("globex", *far)
    assert (acme_day.tokens_trained, acme_day.device_seconds) == (20, 0.5)
    assert (globex_day.tokens_trained, globex_day.device_seconds) == (20, 0.5)
