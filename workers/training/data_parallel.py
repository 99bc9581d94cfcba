"""Data parallelism for the LoRA factors, which every rank holds whole."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Averages the gradients of `params` across ranks with a single all-reduce.

    Every rank passes the same parameters in the same order; a missing gradient counts as
    zero, so the ranks' buffers always line up.
    """
    if world_size == 1 or not params:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [param.grad for param in params if param.grad is not None]
    flat = torch.cat([grad.flatten() for grad in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
