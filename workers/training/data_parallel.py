"""Data parallelism for the LoRA factors, which every rank holds whole."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def average_gradients(
    params: list[nn.Parameter], world_size: int, agree: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Averages the gradients of `params` across ranks with a single all-reduce.

    Every rank passes the same parameters in the same order; a missing gradient counts as
    zero, so the ranks' buffers always line up. `agree`, if given (a pack step's per-job
    failure flags), rides in the same all-reduce and comes back summed over the ranks: the
    ranks learn who failed with no collective of its own.
    """
    if world_size == 1 or (not params and agree is None):
        return agree
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [param.grad for param in params if param.grad is not None]
    parts = [grad.flatten() for grad in grads]
    if agree is not None:
        device = grads[0].device if grads else agree.device
        parts.append(agree.to(device=device, dtype=grads[0].dtype if grads else agree.dtype))
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    summed = flat[len(flat) - len(agree) :].clone() if agree is not None else None
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return summed
