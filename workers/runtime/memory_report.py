"""What one rank holds of the frozen base under ZeRO-3, and how much memory it used."""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch import nn


def rank_memory_report(model: nn.Module, rank: int) -> dict[str, Any]:
    """Per rank: bytes of frozen base weights held locally (its ZeRO-3 shards), the smallest
    and largest share of any one weight, base weights wrongly trainable, peak RSS, and on a
    GPU the device allocator's own peak (what limits a GPU run; RSS says little there)."""
    fractions, requires_grad, held_bytes = [], 0, 0
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        requires_grad += int(param.requires_grad)
        local = param.ds_tensor if hasattr(param, "ds_tensor") else param
        held_bytes += local.numel() * local.element_size()
        fractions.append(local.numel() / getattr(param, "ds_numel", param.numel()))
    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    return {
        "rank": rank,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "base_bytes_held": held_bytes,
        "min_fraction": min(fractions),
        "max_fraction": max(fractions),
        "base_params_requiring_grad": requires_grad,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
