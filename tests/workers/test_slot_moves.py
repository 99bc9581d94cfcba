"""A Tinker model's move between pack hosts (workers.host.slot_moves, workers.host.requests),
without Ray: a model relocated between a `forward_backward` and its `optim_step` goes on,
on another host's slots, bit for bit as if it had never moved; the host's queue moves every
live model once, holds its end until the moves are answered, and bounces later requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.host_protocol import RELOCATE, RESTORE
from core.objectstore import LocalObjectStore
from workers.host.request_slots import RequestSlots
from workers.host.requests import RequestQueue
from workers.lora.packed_layer import Routing, matching_linear_layers, wrap_linear_layers

MODEL = "s:train:0"
LORA = {"rank": 4, "seed": 3}
TEXT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]
HOME = {"prefix": "tinker/t1/s:train:0/relocation/", "path": "tinker://s:train:0/relocation"}


def host(base: Path, store: LocalObjectStore) -> RequestSlots:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.requires_grad_(False)
    routing = Routing()
    layers = wrap_linear_layers(model, matching_linear_layers(model, "all-linear"), routing)
    return RequestSlots(
        model, layers, routing, torch.device("cpu"), pad_token_id=0, rank=0, store=lambda: store
    )


def call(slots: RequestSlots, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    slots.run([{"request_id": kind, "model_id": MODEL, "kind": kind, "payload": payload}])
    (answer,) = slots.take_answers()
    assert answer["error"] is None, answer["error"]
    result: dict[str, Any] = answer["result"]
    return result


def fb() -> dict[str, Any]:
    data = [{"tokens": TEXT[:-1], "target_tokens": TEXT[1:], "weights": [1.0] * 9}]
    return {"loss_fn": "cross_entropy", "data": data}


def adam() -> dict[str, Any]:
    return {
        "adam_params": {
            "learning_rate": 1e-2,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-12,
            "weight_decay": 0.01,
            "grad_clip_norm": 1.0,
        }
    }


def test_a_model_moved_mid_accumulation_goes_on_bit_for_bit(
    tiny_base: Path, tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    alone, first, second = (host(tiny_base, store) for _ in range(3))
    payload = {**HOME, "base_model": "tiny", "lora": LORA}
    steps = ["fb", "optim", "fb", "optim", "fb", "MOVE", "optim", "fb", "optim", "fb"]
    losses: dict[str, list[float]] = {"alone": [], "moved": []}
    call(alone, "create_model", {"lora": LORA})
    call(first, "create_model", {"lora": LORA})
    here = first
    for step in steps:
        if step == "MOVE":  # after a forward_backward: its gradients travel too
            call(here, RELOCATE, payload)
            assert here.live() == []
            here = second
            assert call(here, RESTORE, payload)["model_id"] == MODEL
            continue
        for name, slots in (("alone", alone), ("moved", here)):
            if step == "fb":
                result = call(slots, "forward_backward", fb())
                losses[name].append(result["metrics"]["loss:sum"])
            else:
                call(slots, "optim_step", adam())
    assert losses["moved"] == losses["alone"]  # bit for bit: the same math on the same state
    for mine, theirs in zip(second.slots[MODEL].params, alone.slots[MODEL].params, strict=True):
        assert torch.equal(mine, theirs)
        assert mine.grad is not None and theirs.grad is not None
        assert torch.equal(mine.grad, theirs.grad)
    assert second.slots[MODEL].steps == alone.slots[MODEL].steps == 4


def test_restoring_a_state_saved_before_any_step_starts_a_fresh_optimizer(
    tiny_base: Path, tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    first, second = host(tiny_base, store), host(tiny_base, store)
    payload = {**HOME, "base_model": "tiny", "lora": LORA}
    call(first, "create_model", {"lora": LORA})
    call(first, RELOCATE, payload)
    call(second, RESTORE, payload)
    assert second.slots[MODEL].optimizer is None
    assert all(p.grad is None for p in second.slots[MODEL].params)


def request(model_id: str, kind: str, n: int, home: bool = True) -> dict[str, Any]:
    made = {"request_id": f"{model_id}-{n}", "model_id": model_id, "kind": kind, "payload": {}}
    return {**made, "relocation": {**HOME, "model": model_id}} if home else made


def test_an_ending_hosts_queue_moves_each_model_once_and_bounces_what_comes_after() -> None:
    queue = RequestQueue()
    queue.submit([request("a", "create_model", 0), request("b", "create_model", 0)])
    queue.take()
    queue.answer([], live=["a", "b"])
    moves = queue.relocations()
    assert [(m["model_id"], m["kind"]) for m in moves] == [("a", RELOCATE), ("b", RELOCATE)]
    assert moves[0]["payload"]["model"] == "a"  # where its own state goes
    assert queue.relocations() == []  # once each
    assert queue.holds_end()
    queue.submit([request("a", "optim_step", 5)])  # after its move: handed back unrun
    assert queue.take() == []
    (bounced,) = queue.collect()
    assert bounced["bounced"] and bounced["request_id"] == "a-5"
    queue.answer([{"request_id": "relocate-a", "model_id": "a", "kind": RELOCATE}], live=["b"])
    assert queue.holds_end() and queue.owes_moves()  # b still moving; a's answer not taken
    queue.answer([{"request_id": "relocate-b", "model_id": "b", "kind": RELOCATE}], live=[])
    assert not queue.holds_end()
    assert len(queue.collect()) == 2 and not queue.owes_moves()


def test_a_model_never_told_where_to_go_is_not_moved_and_a_restore_takes_it_back() -> None:
    queue = RequestQueue()
    queue.submit([request("a", "create_model", 0, home=False)])
    queue.answer([], live=["a"])
    assert queue.relocations() == [] and not queue.holds_end()
    queue.submit([request("b", "create_model", 0)])
    queue.answer([], live=["a", "b"])
    assert [m["model_id"] for m in queue.relocations()] == ["b"]
    queue.submit([request("b", RESTORE, 9)])  # the model comes back here: it runs again
    assert [r["kind"] for r in queue.take()] == ["create_model", "create_model", RESTORE]


@pytest.mark.parametrize("moved_at", [None, 4])
def test_restore_point_rules(moved_at: int | None) -> None:
    from orchestrator.tinker.relocation import RestorePoint, restore_point

    class Row:
        def __init__(self, seq: int, kind: str, state: str = "done", **payload: Any) -> None:
            self.seq_id, self.kind, self.state, self.payload = seq, kind, state, payload

    save = {"optimizer": True, "prefix": "p/", "path": "tinker://m/weights/x"}
    moved = RestorePoint(moved_at, "r/", "tinker://m/relocation") if moved_at else None
    rows = [
        Row(0, "create_model"),
        Row(1, "forward_backward"),
        Row(2, "optim_step"),
        Row(3, "save_weights", **save),  # gradients empty: a whole state
        Row(4, "forward"),
    ]
    point = restore_point(rows, moved)
    assert point == (moved or RestorePoint(3, "p/", "tinker://m/weights/x"))
    # A step the client saw after it: that state is stale, the model's latest is lost.
    assert restore_point([*rows, Row(5, "forward_backward")], moved) is None
    # In flight (sent, never answered) is not seen: it runs again after the restore.
    assert restore_point([*rows, Row(5, "forward_backward", "sent")], moved) == point
    # A save taken between forward_backward and optim_step lacks the summed gradients.
    mid = [Row(0, "create_model"), Row(1, "forward_backward"), Row(2, "save_weights", **save)]
    assert restore_point(mid, None) is None


def test_restarted_workers_lose_their_models_bounce_their_work_and_say_so() -> None:
    from core.host_protocol import LOST

    queue = RequestQueue()
    queue.submit([request("a", "create_model", 0), request("b", "create_model", 0)])
    queue.take()
    queue.answer([{"request_id": "a-0", "model_id": "a", "kind": "create_model"}], live=["a"])
    queue.submit([request("a", "forward_backward", 1)])
    queue.take()  # on the workers when they die, with b's creation
    queue.submit([request("a", "optim_step", 2)])  # queued, not taken yet
    queue.collect()
    assert queue.workers_lost()
    answers = queue.collect()
    assert [(a["request_id"], a.get("bounced", False)) for a in answers[:3]] == [
        ("b-0", True),
        ("a-1", True),
        ("a-2", True),
    ]
    assert [(a["model_id"], a["kind"]) for a in answers[3:]] == [("a", LOST), ("b", LOST)]
    assert queue.take() == [] and not queue.holds_end()
    queue.submit([request("a", "forward", 3)])  # bounced until it is restored
    assert queue.collect()[0]["bounced"]
    assert not queue.workers_lost()  # a second restart with nothing on it: nothing to say
