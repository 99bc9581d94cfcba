"""The dispatcher's side of a Tinker model's move (orchestrator.tinker.relocation) on SQLite,
without Ray: a host's `relocate` answer leaves the model without a host and its bounced
requests pending again, and the restore goes first on the next host; a host lost without
warning restores a model whose saved state is current and fails one whose isn't, with an
error that names what to load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.host_protocol import LOST, RELOCATE, RESTORE
from orchestrator.db import make_engine, migrate
from orchestrator.tinker.relocation import RELOCATION, Relocations, relocation_home
from orchestrator.tinker.rows import FAILED, MODEL_FAILED, MODEL_LIVE, PENDING
from orchestrator.tinker.store import TinkerStore

LORA = {"rank": 4, "seed": 0}
ADAM = {"adam_params": {"learning_rate": 1e-3}}


@pytest.fixture()
def store(tmp_path: Path) -> TinkerStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'lorafleet.db'}")
    migrate(engine)
    return TinkerStore(engine)


def live_model(store: TinkerStore, steps: int) -> tuple[str, list[str]]:
    """A model on host-a with `steps` forward_backward + optim_step pairs answered."""
    session = store.create_session("t1")
    created = store.create_model("t1", session, 0, "tiny", LORA)
    model_id = created.model_id
    ids = [created.id]
    for _ in range(steps):
        for kind in ("forward_backward", "optim_step"):
            ids.append(store.add_request("t1", model_id, len(ids), kind, ADAM).id)
    store.set_model(model_id, MODEL_LIVE, host_id="host-a")
    store.mark_sent(ids)
    for request_id in ids:
        store.finish(request_id, {}, None)
    return model_id, ids


def test_a_moved_model_waits_for_its_bounced_requests_then_restores_first(
    store: TinkerStore,
) -> None:
    model_id, _ = live_model(store, 1)
    moves = Relocations(store)
    model = store.model("t1", model_id)
    tagged = moves.tag(model, {"request_id": "r", "model_id": model_id, "kind": "forward"})
    assert tagged["relocation"]["prefix"] == f"tinker/t1/{model_id}/{RELOCATION}/"
    late = store.add_request("t1", model_id, 3, "forward_backward", {})
    store.mark_sent([late.id])  # handed to host-a after it had moved the model: bounced
    home = relocation_home(model)
    answers = [
        {"request_id": "x", "model_id": model_id, "kind": "forward", "result": {}, "error": None},
        {
            "request_id": f"relocate-{model_id}",
            "model_id": model_id,
            "kind": RELOCATE,
            "result": {"prefix": home["prefix"], "path": home["path"]},
            "error": None,
        },
    ]
    assert [a["request_id"] for a in moves.settle(answers)] == ["x"]  # the client's only
    assert store.model("t1", model_id).host_id is None
    assert moves.points[model_id].seq == 2 and not moves.may_place(model)  # `late` is out
    bounced = {
        "request_id": late.id,
        "model_id": model_id,
        "kind": "forward_backward",
        "result": None,
        "error": None,
        "bounced": True,
    }
    assert moves.settle([bounced]) == []
    assert store.request("t1", late.id).state == PENDING and moves.may_place(model)
    restore = moves.restore(model)
    assert restore["kind"] == RESTORE and restore["payload"]["prefix"] == home["prefix"]


def test_a_lost_host_restores_a_current_save_and_fails_a_stale_one(store: TinkerStore) -> None:
    saved, ids = live_model(store, 2)
    save = {"optimizer": True, "prefix": "tinker/t1/m/weights/s/", "path": "tinker://m/weights/s"}
    row = store.add_request("t1", saved, len(ids), "save_weights", save)
    store.mark_sent([row.id])
    store.finish(row.id, {}, None)
    in_flight = store.add_request("t1", saved, len(ids) + 1, "forward_backward", {})
    store.mark_sent([in_flight.id])
    stale, stale_ids = live_model(store, 1)
    early = store.add_request("t1", stale, len(stale_ids), "save_weights", save)
    store.mark_sent([early.id])
    store.finish(early.id, {}, None)
    late = store.add_request("t1", stale, len(stale_ids) + 1, "forward_backward", ADAM)
    store.mark_sent([late.id])
    store.finish(late.id, {}, None)  # a step after the save: the save is stale
    stuck = store.add_request("t1", stale, len(stale_ids) + 2, "forward_backward", {})
    store.mark_sent([stuck.id])
    moves = Relocations(store)
    for model_id in (saved, stale):
        moves.host_lost(store.model("t1", model_id), "with its pack host host-a")
    # Restored from the save; what was in flight runs again on the next host.
    assert store.model("t1", saved).state == MODEL_LIVE
    assert store.model("t1", saved).host_id is None
    assert moves.restore(store.model("t1", saved))["payload"]["prefix"] == save["prefix"]
    assert store.request("t1", in_flight.id).state == PENDING
    # No saved state holds its latest step: it fails, and says what to load.
    assert store.model("t1", stale).state == MODEL_FAILED
    error = store.model("t1", stale).error or ""
    assert "lost with its pack host host-a" in error
    assert "create_training_client_from_state_with_optimizer" in error
    assert f"(your newest: {save['path']})" in error
    answered = store.request("t1", stuck.id)  # its future answers the error at once
    assert answered.state == FAILED and answered.error == error


def test_a_lost_notice_restores_or_fails_like_a_lost_host(store: TinkerStore) -> None:
    model_id, _ = live_model(store, 1)
    notice = {
        "request_id": f"lost-{model_id}",
        "model_id": model_id,
        "kind": LOST,
        "result": None,
        "error": "its pack host's workers restarted",
    }
    assert Relocations(store).settle([notice]) == []
    error = store.model("t1", model_id).error or ""
    assert "was lost when its pack host's workers restarted" in error


def test_a_model_created_during_a_dispatch_pass_is_not_taken_for_ended(
    store: TinkerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API commits a new model and its creation request while a pass is between its
    reads: the request waits for the next pass (no warm host here), it does not fail."""
    from orchestrator.tinker.dispatch import TinkerDispatcher

    session = store.create_session("t1")
    created: list[str] = []
    read_models = store.models

    def models_then_a_new_one(states: tuple[str, ...]) -> list[object]:
        found = read_models(states)
        if not created:
            created.append(store.create_model("t1", session, 0, "tiny", LORA).id)
        return found  # type: ignore[return-value]

    monkeypatch.setattr(store, "models", models_then_a_new_one)
    dispatcher = TinkerDispatcher(store, reports=dict, namespace="unused")
    dispatcher.dispatch_once()
    dispatcher.dispatch_once()  # the next pass sees it: still no host, still pending
    assert store.request("t1", created[0]).state == PENDING


def test_requests_whose_hand_over_timed_out_are_still_collected(
    store: TinkerStore, ray_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that acknowledges late still runs what it was handed (Ray delivers an actor's
    calls while it lives): the dispatcher owes those answers, so its collector reads them.
    A real actor on the session's Ray, slower to answer than the (shortened) call timeout."""
    import ray

    from orchestrator.tinker import dispatch
    from orchestrator.tinker.dispatch import TinkerDispatcher

    @ray.remote(num_cpus=0)
    class SlowHost:
        def tinker_submit(self, requests: list[dict[str, object]]) -> None:
            time.sleep(2.0)

    host = SlowHost.remote()  # type: ignore[attr-defined]
    monkeypatch.setattr(dispatch, "CALL_TIMEOUT_SECONDS", 0.2)
    dispatcher = TinkerDispatcher(store, reports=dict, namespace="unused")
    dispatcher._stop.set()  # its collector ends at once: this test reads what is owed
    with pytest.raises(ray.exceptions.GetTimeoutError):
        dispatcher._send("host-a", host, [{"request_id": "r1"}, {"request_id": "r2"}])
    assert dispatcher._unanswered == {"host-a": 2}
    ray.kill(host)
