"""One Tinker model on a rank of a pack host (a request-driven slot, issue 21), and the error
of a request that cannot run as sent (workers.host.request_slots runs the requests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workers.lora.packed_layer import SlotConfig


class RequestError(ValueError):
    """The request cannot run as sent (its answer says why; the model lives on)."""


@dataclass
class RequestSlot:
    """One Tinker model on this rank: its factors' layers and its own optimizer."""

    model_id: str
    config: SlotConfig
    paths: list[str]
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.AdamW | None = None
    steps: int = 0
