"""Moving a Tinker model between pack hosts (a drain, an upgrade, a host's end): the state a
request-driven slot carries over besides its factors and AdamW's (what `save_state` writes),
namely the gradients summed since its last `optim_step`, so that a move between a client's
`forward_backward` and its `optim_step` changes nothing.

`relocate` (on the host that ends) writes the whole state under the model's relocation
prefix and frees the slot; `restore` (on the host that takes it) makes the slot again from
that prefix, or from a state the client saved itself. And the same gradients held across
a pass that must leave them as they were (`held_grads`, `put_back_grads`).
"""

from __future__ import annotations

import io

import torch
from torch import nn

GRADS = "grads.pt"  # beside the adapter and optimizer.pt, written before lorafleet.json


def grads_bytes(params: list[nn.Parameter]) -> bytes:
    """The summed gradients of a slot's factors (None where a factor has none yet), in the
    factors' fixed order (`slot_parameters`: sorted by layer path, the same on every host)."""
    grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in params]
    buffer = io.BytesIO()
    torch.save(grads, buffer)
    return buffer.getvalue()


def put_grads(params: list[nn.Parameter], data: bytes) -> None:
    """Gives each factor back the gradient `grads_bytes` wrote for it."""
    grads = torch.load(io.BytesIO(data), weights_only=True)
    if len(grads) != len(params):
        raise ValueError(f"saved gradients of {len(grads)} factors, the slot has {len(params)}")
    for param, grad in zip(params, grads, strict=True):
        param.grad = None if grad is None else grad.to(param.device, param.dtype)


# A slot's factors' summed gradients as they stood before a pass whose part for the slot may
# fail or must add nothing (None where a factor had none).
HeldGrads = list[torch.Tensor | None]


def held_grads(params: list[nn.Parameter], copy: bool = True) -> HeldGrads:
    """`copy`: their values (a pass that fails part-way through its backward may have added
    to them). Without: the tensors themselves, for a pass that can add only zeros to this
    slot (its rows' gradient is zero): what must go is a gradient made where there was none."""
    return [None if p.grad is None else p.grad.detach().clone() if copy else p.grad for p in params]


def put_back_grads(params: list[nn.Parameter], held: HeldGrads) -> None:
    """Each factor's gradient as `held_grads` kept it: a failed request, or a `forward` that
    went through a backward beside others' rows, adds nothing, not even zeros (a zero gradient
    where there was none would still step AdamW's moments and count at the next optim_step)."""
    for param, grad in zip(params, held, strict=True):
        param.grad = grad
