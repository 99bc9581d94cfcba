"""Tinker's losses on one datum (issue 21), pure torch: each takes the datum's logits and
its per-token inputs, and gives the loss (a sum over its tokens), the per-token
log-probabilities of the targets and the per-token loss, all in fp32. The formulas are the
SDK documentation's (tinker-docs.thinkingmachines.ai/tinker/losses), token by token."""

from __future__ import annotations

from typing import Any

import torch

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo")
# The clipped losses' `loss_fn_config` keys and Tinker's defaults for them: PPO clips the
# ratio to 1 ± 0.2; CISPO caps it above only (no lower bound, at most 4).
CLIP_KEYS = ("clip_low_threshold", "clip_high_threshold")
CLIP_DEFAULTS = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0)}


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each position's log-probability of its target token (fp32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tinker's `cross_entropy` on one datum: (loss, per-token logprobs of the targets).
    loss = sum over tokens of -logprob(target) * weight; weights may be any float."""
    chosen = target_logprobs(logits, targets)
    return -(chosen * weights).sum(), chosen


def importance_sampling(
    logits: torch.Tensor, targets: torch.Tensor, sampled: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tinker's `importance_sampling` (REINFORCE off the sampler's policy) on one datum:
    loss = -sum over tokens of exp(logprob - sampling logprob) * advantage."""
    chosen = target_logprobs(logits, targets)
    return -(torch.exp(chosen - sampled) * advantages).sum(), chosen


def ppo(
    logits: torch.Tensor,
    targets: torch.Tensor,
    sampled: torch.Tensor,
    advantages: torch.Tensor,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tinker's `ppo` on one datum: (loss, per-token logprobs, per-token loss), the per-token
    loss -min(ratio * advantage, clamp(ratio, low, high) * advantage)."""
    chosen = target_logprobs(logits, targets)
    ratio = torch.exp(chosen - sampled)
    clipped = torch.clamp(ratio, low, high)
    each = -torch.min(ratio * advantages, clipped * advantages)
    return each.sum(), chosen, each


def cispo(
    logits: torch.Tensor,
    targets: torch.Tensor,
    sampled: torch.Tensor,
    advantages: torch.Tensor,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tinker's `cispo` on one datum: the clipped ratio, detached, weighs each token's
    log-prob times its advantage; per-token loss -sg(clamp(ratio, low, high)) * logprob * A."""
    chosen = target_logprobs(logits, targets)
    clipped = torch.clamp(torch.exp(chosen - sampled), low, high).detach()
    each = -(clipped * chosen * advantages)
    return each.sum(), chosen, each


def clip_thresholds(loss_fn: str, config: dict[str, float] | None) -> tuple[float, float]:
    """(low, high) of a clipped loss: the request's `loss_fn_config`, else Tinker's default."""
    low, high = CLIP_DEFAULTS[loss_fn]
    config = config or {}
    return float(config.get(CLIP_KEYS[0], low)), float(config.get(CLIP_KEYS[1], high))


def datum_loss(
    loss_fn: str,
    logits: torch.Tensor,
    datum: dict[str, Any],
    device: torch.device,
    config: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-token logprobs, per-token loss) of one datum under the request's loss and
    its `loss_fn_config`."""

    def floats(name: str) -> torch.Tensor:
        return torch.tensor(datum[name], dtype=torch.float32, device=device)

    targets = torch.tensor(datum["target_tokens"], dtype=torch.long, device=device)
    if loss_fn in CLIP_DEFAULTS:
        low, high = clip_thresholds(loss_fn, config)
        clipped_loss = ppo if loss_fn == "ppo" else cispo
        return clipped_loss(logits, targets, floats("logprobs"), floats("advantages"), low, high)
    if loss_fn == "importance_sampling":
        sampled, advantages = floats("logprobs"), floats("advantages")
        loss, chosen = importance_sampling(logits, targets, sampled, advantages)
        return loss, chosen, -(torch.exp(chosen - sampled) * advantages)
    weights = floats("weights")
    loss, chosen = cross_entropy(logits, targets, weights)
    return loss, chosen, -(chosen * weights)
