"""Tinker's clipped policy losses `ppo` and `cispo` (workers.host.tinker_losses) against a
hand-written torch reference of the SDK documentation's formulas, and through request-driven
slots on the tiny Llama: per-token logprobs, `loss:sum`, and gradients of two
forward_backward calls adding up to one call on all their data."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.workers.test_request_slots import OTHER, TEXT, adam, create, grads, run, slots
from workers.host.request_slots import RequestSlots
from workers.host.tinker_losses import cispo, clip_thresholds, datum_loss, ppo

__all__ = ["slots"]  # the fixture, shared with test_request_slots

TARGETS = torch.tensor([4, 0, 6, 2, 5])
# Sampler log-probs chosen so the ratios fall below, inside and above the clip range.
SAMPLED = torch.tensor([-0.2, -4.0, -1.9, -3.5, -0.1])
ADVANTAGES = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7])


def reference(loss_fn: str, logits: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The per-token loss written out by hand, one token at a time."""
    out = []
    for i, target in enumerate(TARGETS.tolist()):
        logprob = torch.log_softmax(logits[i], -1)[target]
        ratio = torch.exp(logprob - SAMPLED[i])
        bound = min(max(ratio.item(), low), high)
        if loss_fn == "ppo":  # inside the range the clipped ratio is the ratio itself
            clipped = ratio if bound == ratio.item() else torch.tensor(bound)
            out.append(-torch.minimum(ratio * ADVANTAGES[i], clipped * ADVANTAGES[i]))
        else:  # cispo: the clipped ratio is a constant coefficient on the log-prob
            out.append(-(bound * logprob * ADVANTAGES[i]))
    return torch.stack(out)


@pytest.mark.parametrize(("loss_fn", "low", "high"), [("ppo", 0.8, 1.2), ("cispo", 0.0, 4.0)])
def test_clipped_losses_equal_the_documented_formula_and_its_gradient(
    loss_fn: str, low: float, high: float
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    ratios = torch.exp(torch.log_softmax(logits, -1)[torch.arange(5), TARGETS] - SAMPLED)
    assert (ratios < low).any() or loss_fn == "cispo"  # some tokens are clipped
    assert (ratios > high).any()
    fn = ppo if loss_fn == "ppo" else cispo
    loss, logprobs, each = fn(logits, TARGETS, SAMPLED, ADVANTAGES, low, high)
    expected = reference(loss_fn, logits, low, high)
    torch.testing.assert_close(each, expected)
    torch.testing.assert_close(loss, expected.sum())
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[torch.arange(5), TARGETS])
    (got,) = torch.autograd.grad(loss, logits)
    (want,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(got, want)


def test_ppo_passes_no_gradient_where_the_clip_binds_and_cispo_always_does() -> None:
    logits = torch.zeros(1, 4, requires_grad=True)  # log-prob of any token: log(1/4)
    target, advantage = torch.tensor([1]), torch.tensor([1.0])
    sampled = torch.tensor([torch.log(torch.tensor(0.25)).item() - 1.0])  # ratio e > 1.2
    (ppo_grad,) = torch.autograd.grad(ppo(logits, target, sampled, advantage, 0.8, 1.2)[0], logits)
    assert torch.count_nonzero(ppo_grad) == 0
    loss = cispo(logits, target, sampled, advantage, 0.8, 1.2)[0]
    (cispo_grad,) = torch.autograd.grad(loss, logits)
    # d(-1.2 * logprob)/d logits = -1.2 * (onehot - softmax)
    torch.testing.assert_close(cispo_grad[0], -1.2 * (torch.eye(4)[1] - 0.25))


def test_the_config_overrides_the_defaults_and_datum_loss_reads_it() -> None:
    assert clip_thresholds("ppo", None) == (0.8, 1.2)
    assert clip_thresholds("cispo", {}) == (0.0, 4.0)
    assert clip_thresholds("ppo", {"clip_high_threshold": 1.1}) == (0.8, 1.1)
    logits = torch.randn(5, 7)
    datum = {
        "target_tokens": TARGETS.tolist(),
        "logprobs": SAMPLED.tolist(),
        "advantages": ADVANTAGES.tolist(),
    }
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    loss, _, each = datum_loss("ppo", logits, datum, torch.device("cpu"), config)
    torch.testing.assert_close(each, reference("ppo", logits, 0.5, 1.5))
    assert loss.item() == pytest.approx(each.sum().item())


def rl_datum(tokens: list[int], shift: float) -> dict[str, Any]:
    n = len(tokens) - 1
    return {
        "tokens": tokens[:-1],
        "target_tokens": tokens[1:],
        # Far from the model's own log-probs, so both clip bounds bind on some tokens.
        "logprobs": [-6.0 + shift * (i % 3) * 2.5 for i in range(n)],
        "advantages": [1.0 if i % 2 else -0.75 for i in range(n)],
    }


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_two_forward_backwards_add_up_to_one_on_all_their_data(
    slots: RequestSlots, loss_fn: str
) -> None:
    create(slots)
    params = slots.slots["s:train:0"].params
    run(slots, "s:train:0", "optim_step", adam())  # B leaves zero, so A gets gradients too
    config = {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}
    a, b = rl_datum(TEXT, 1.0), rl_datum(OTHER, 2.0)

    def fb(data: list[dict[str, Any]]) -> dict[str, Any]:
        payload = {"loss_fn": loss_fn, "loss_fn_config": config, "data": data}
        return run(slots, "s:train:0", "forward_backward", payload)

    both = fb([a, b])
    together = grads(params)
    assert any(torch.count_nonzero(g) for g in together)
    run(slots, "s:train:0", "optim_step", adam(learning_rate=0.0))  # clears the gradients
    first, second = fb([a]), fb([b])
    for summed, param in zip(together, params, strict=True):
        torch.testing.assert_close(param.grad, summed, rtol=1e-5, atol=1e-7)
    loss = first["metrics"]["loss:sum"] + second["metrics"]["loss:sum"]
    assert loss == pytest.approx(both["metrics"]["loss:sum"], rel=1e-6)
    assert set(both["metrics"]) == {"loss:sum"}  # name:reduction, one colon
    out = both["outputs"][0]
    assert len(out["logprobs"]) == len(TEXT) - 1
    assert sum(out["elementwise_loss"]) + sum(both["outputs"][1]["elementwise_loss"]) == (
        pytest.approx(both["metrics"]["loss:sum"], rel=1e-5)
    )
