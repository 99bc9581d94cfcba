"""Request-driven slots (workers.host.request_slots) on the tiny Llama, without Ray: the
Tinker loss, summed gradients across forward_backward calls, and AdamW with the request's
parameters, against plain torch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.host.request_slots import RequestSlots
from workers.host.tinker_losses import cross_entropy, importance_sampling
from workers.lora.packed_layer import Routing, adaptable_layers, wrap_linear_layers

TEXT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]
OTHER = [9, 8, 7, 6, 5, 4, 3]


@pytest.fixture()
def slots(tiny_base: Path) -> RequestSlots:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.requires_grad_(False)
    routing = Routing()
    layers = wrap_linear_layers(model, adaptable_layers(model), routing)
    return RequestSlots(model, layers, routing, torch.device("cpu"), pad_token_id=0, rank=0)


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:
        assert p.grad is not None
        out.append(p.grad.clone())
    return out


def datum(tokens: list[int], weight: float = 1.0) -> dict[str, Any]:
    return {
        "tokens": tokens[:-1],
        "target_tokens": tokens[1:],
        "weights": [weight] * (len(tokens) - 1),
    }


def run(slots: RequestSlots, model_id: str, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    slots.run([{"request_id": "r", "model_id": model_id, "kind": kind, "payload": payload}])
    (answer,) = slots.take_answers()
    assert answer["error"] is None, answer["error"]
    result: dict[str, Any] = answer["result"]
    return result


def create(slots: RequestSlots, model_id: str = "s:train:0", rank: int = 4) -> None:
    lora = {"rank": rank, "seed": 3, "train_mlp": True, "train_attn": True}
    run(slots, model_id, "create_model", {"lora": lora})


def fb(slots: RequestSlots, data: list[dict[str, Any]], kind: str = "forward_backward") -> Any:
    return run(slots, "s:train:0", kind, {"loss_fn": "cross_entropy", "data": data})


def adam(**params: float) -> dict[str, Any]:
    defaults = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12}
    return {"adam_params": {**defaults, "weight_decay": 0.0, "grad_clip_norm": 0.0, **params}}


def test_cross_entropy_is_the_weighted_sum_of_target_logprobs() -> None:
    logits = torch.randn(4, 11)
    targets = torch.tensor([1, 2, 3, 4])
    weights = torch.tensor([0.0, 1.0, -0.5, 2.0])
    loss, logprobs = cross_entropy(logits, targets, weights)
    expected = torch.log_softmax(logits, -1)[torch.arange(4), targets]
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(loss, -(expected * weights).sum())


def test_importance_sampling_weighs_each_token_by_its_ratio_to_the_sampler() -> None:
    logits = torch.randn(3, 7, requires_grad=True)
    targets = torch.tensor([4, 0, 6])
    sampled = torch.tensor([-1.5, -2.0, -0.5])
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, logprobs = importance_sampling(logits, targets, sampled, advantages)
    ratio = torch.exp(logprobs - sampled)
    torch.testing.assert_close(loss, -(ratio * advantages).sum())
    # Its gradient is REINFORCE's, each token's log-prob weighed by ratio * advantage.
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, -(ratio * advantages).detach())


def test_two_forward_backwards_add_up_to_one_on_all_their_data(slots: RequestSlots) -> None:
    create(slots)
    params = slots.slots["s:train:0"].params
    run(slots, "s:train:0", "optim_step", adam())  # B leaves zero, so A gets gradients too
    both = fb(slots, [datum(TEXT), datum(OTHER, 0.5)])
    together = grads(params)
    run(slots, "s:train:0", "optim_step", adam(learning_rate=0.0))  # clears the gradients
    first, second = fb(slots, [datum(TEXT)]), fb(slots, [datum(OTHER, 0.5)])
    for summed, grad in zip(together, params, strict=True):
        torch.testing.assert_close(grad.grad, summed, rtol=1e-5, atol=1e-7)
    loss = first["metrics"]["loss:sum"] + second["metrics"]["loss:sum"]
    assert loss == pytest.approx(both["metrics"]["loss:sum"], rel=1e-6)
    assert set(both["metrics"]) == {"loss:sum"}  # name:reduction, one colon
    assert len(both["outputs"][0]["logprobs"]) == len(TEXT) - 1


def test_optim_step_is_adamw_with_the_requests_parameters(slots: RequestSlots) -> None:
    create(slots)
    slot = slots.slots["s:train:0"]
    run(slots, "s:train:0", "optim_step", adam())
    fb(slots, [datum(TEXT)])
    reference = [copy.deepcopy(p) for p in slot.params]
    for ref, p in zip(reference, slot.params, strict=True):
        ref.grad = grads([p])[0]
    params = {"learning_rate": 3e-3, "beta1": 0.8, "beta2": 0.9, "eps": 1e-8}
    torch_adam = torch.optim.AdamW(reference, lr=3e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    # The slot's optimizer already took one step (with no gradients: nothing moved).
    torch_adam.step()
    run(slots, "s:train:0", "optim_step", adam(**params, weight_decay=0.1, grad_clip_norm=0.5))
    for ref, p in zip(reference, slot.params, strict=True):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-8)
        assert p.grad is None  # cleared for the next accumulation


def test_twenty_steps_lower_the_loss_and_forward_matches(slots: RequestSlots) -> None:
    create(slots, rank=8)
    losses = []
    for _ in range(20):
        losses.append(fb(slots, [datum(TEXT)])["metrics"]["loss:sum"])
        run(slots, "s:train:0", "optim_step", adam(learning_rate=3e-3))
    # The tiny base's logits span little: the loss falls steadily but not far.
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(losses[10:]) < sum(losses[:10]), losses
    forward = fb(slots, [datum(TEXT)], kind="forward")["metrics"]["loss:sum"]
    assert forward == pytest.approx(fb(slots, [datum(TEXT)])["metrics"]["loss:sum"], rel=1e-6)


def test_a_bad_request_fails_alone_and_dropping_frees_the_slot(slots: RequestSlots) -> None:
    create(slots)
    slots.run(
        [
            {"request_id": "a", "model_id": "nope", "kind": "optim_step", "payload": adam()},
            {"request_id": "b", "model_id": "s:train:0", "kind": "optim_step", "payload": adam()},
        ]
    )
    bad, good = slots.take_answers()
    assert "not on this host" in bad["error"] and good["error"] is None
    run(slots, "s:train:0", "drop_model", {})
    assert slots.live() == []
    assert all("s:train:0" not in layer.slots for layer in slots.layers.values())


def test_two_models_queued_together_share_one_pass_and_equal_themselves_alone(
    slots: RequestSlots,
) -> None:
    for name, seed in (("a:train:0", 1), ("b:train:0", 2)):
        run(slots, name, "create_model", {"lora": {"rank": 4, "seed": seed}})
        run(slots, name, "optim_step", adam())  # B leaves zero: both adapters differ
    work = {
        "a:train:0": [datum(TEXT), datum(OTHER, 0.5)],
        "b:train:0": [datum(OTHER)],
    }

    def request(name: str, kind: str = "forward_backward") -> dict[str, Any]:
        payload = {"loss_fn": "cross_entropy", "data": work[name]}
        return {"request_id": name, "model_id": name, "kind": kind, "payload": payload}

    alone = {}
    for name in work:  # each alone, then its gradients cleared without a step
        alone[name] = (
            run(slots, name, "forward_backward", request(name)["payload"]),
            grads(slots.slots[name].params),
        )
        for p in slots.slots[name].params:
            p.grad = None
    forwards = slots.routing.forward_id
    slots.run([request("a:train:0"), request("b:train:0")])
    assert slots.routing.forward_id == forwards + 1  # one pass through the base for both
    answers = {a["model_id"]: a for a in slots.take_answers()}
    # Usage (core.usage): each model's trained tokens, and the pass's time split 15 : 6.
    used = {name: answers[name]["usage"] for name in work}
    assert used["a:train:0"]["tokens"] == {"trained": 15}
    assert used["b:train:0"]["tokens"] == {"trained": 6}
    assert used["a:train:0"]["device_seconds"] == pytest.approx(
        2.5 * used["b:train:0"]["device_seconds"]
    )
    for name, (result, expected) in alone.items():
        packed = answers[name]["result"]
        assert packed["metrics"]["loss:sum"] == pytest.approx(
            result["metrics"]["loss:sum"], rel=1e-5
        )
        for mine, theirs in zip(packed["outputs"], result["outputs"], strict=True):
            torch.testing.assert_close(mine["logprobs"], theirs["logprobs"], rtol=1e-5, atol=1e-5)
        for p, grad in zip(slots.slots[name].params, expected, strict=True):
            torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-6)


def test_a_model_of_another_padded_width_takes_a_pass_of_its_own_and_equals_itself_alone(
    slots: RequestSlots,
) -> None:
    for name, seed in (("a:train:0", 1), ("b:train:0", 2), ("long:train:0", 3)):
        run(slots, name, "create_model", {"lora": {"rank": 4, "seed": seed}})
        run(slots, name, "optim_step", adam())
    work = {
        "a:train:0": [datum(TEXT)],  # 9 tokens: padded to 16
        "long:train:0": [datum(TEXT * 3)],  # 29 tokens: padded to 32
        "b:train:0": [datum(OTHER)],  # 6 tokens: padded to 16
    }

    def payload(name: str) -> dict[str, Any]:
        return {"loss_fn": "cross_entropy", "data": work[name]}

    alone = {}
    for name in work:
        alone[name] = run(slots, name, "forward", payload(name))
    forwards = slots.routing.forward_id
    slots.run(
        [
            {"request_id": name, "model_id": name, "kind": "forward", "payload": payload(name)}
            for name in work
        ]
    )
    assert slots.routing.forward_id == forwards + 2  # a with b, then long alone
    answers = {a["model_id"]: a for a in slots.take_answers()}
    for name, result in alone.items():  # bit for bit: each padded as it is alone
        assert answers[name]["error"] is None
        assert answers[name]["result"]["outputs"] == result["outputs"], name


def test_train_unembed_adapts_lm_head_and_the_saved_adapter_is_forward_in_peft(
    slots: RequestSlots, tiny_base: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.objectstore import LocalObjectStore

    lora = {"rank": 4, "seed": 3}
    run(slots, "u:train:0", "create_model", {"lora": lora})  # the SDK's default: True
    run(slots, "n:train:0", "create_model", {"lora": {**lora, "train_unembed": False}})
    head = slots.layers["lm_head"]
    assert "u:train:0" in head.slots and "n:train:0" not in head.slots
    before = head.lora_B["u:train:0"].detach().clone()
    for _ in range(3):
        run(
            slots,
            "u:train:0",
            "forward_backward",
            {"loss_fn": "cross_entropy", "data": [datum(TEXT)]},
        )
        run(slots, "u:train:0", "optim_step", adam(learning_rate=1e-2))
    assert not torch.equal(head.lora_B["u:train:0"].detach(), before)

    slots.store = lambda: LocalObjectStore(tmp_path / "store")
    save = {"prefix": "u/", "path": "tinker://u", "base_model": str(tiny_base), "lora": lora}
    run(slots, "u:train:0", "save_weights", {**save, "optimizer": False})
    folder = tmp_path / "store" / "u"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder)  # lm_head as a LoRA layer of peft's
    expected = run(
        slots, "u:train:0", "forward", {"loss_fn": "cross_entropy", "data": [datum(TEXT)]}
    )
    with torch.no_grad():
        logits = peft_model(torch.tensor([TEXT[:-1]])).logits[0]
    ours = torch.log_softmax(logits, -1)[torch.arange(len(TEXT) - 1), torch.tensor(TEXT[1:])]
    torch.testing.assert_close(
        ours.tolist(), expected["outputs"][0]["logprobs"], rtol=1e-5, atol=1e-5
    )
