"""Tinker's losses on one datum (issue 21), pure torch: each takes the datum's logits and
its per-token inputs, and gives the loss (a sum over its tokens), the per-token
log-probabilities of the targets and the per-token loss, all in fp32."""

from __future__ import annotations

from typing import Any

import torch

LOSSES = ("cross_entropy", "importance_sampling")


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


def datum_loss(
    loss_fn: str, logits: torch.Tensor, datum: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-token logprobs, per-token loss) of one datum under the request's loss."""

    def floats(name: str) -> torch.Tensor:
        return torch.tensor(datum[name], dtype=torch.float32, device=device)

    targets = torch.tensor(datum["target_tokens"], dtype=torch.long, device=device)
    if loss_fn == "importance_sampling":
        sampled, advantages = floats("logprobs"), floats("advantages")
        loss, chosen = importance_sampling(logits, targets, sampled, advantages)
        return loss, chosen, -(torch.exp(chosen - sampled) * advantages)
    weights = floats("weights")
    loss, chosen = cross_entropy(logits, targets, weights)
    return loss, chosen, -(chosen * weights)
