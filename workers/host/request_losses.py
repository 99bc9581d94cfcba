"""A Tinker request's forward work through the shared base (issue 21): its rows, padded to
its own width, and its losses from its block of logits. One path whether it runs in a pass
of Tinker requests (workers.host.request_slots) or rides a job's step
(workers.host.step_riders): its results are the same either way, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.host.tinker_losses import datum_loss
from workers.lora.packed_layer import Routing


def padded_width(lengths: list[int], bucket: int) -> int:
    """A request's rows are padded to its own longest datum rounded up to `bucket`, on a
    host of its own or riding a step: the same width either way, as a job's rows."""
    return -(-max(lengths) // bucket) * bucket


def request_rows(
    data: list[dict[str, Any]], pad_token_id: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of the data's tokens, each row padded to `width`."""
    ids = torch.full((len(data), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(data), width), dtype=torch.long)
    for row, datum in enumerate(data):
        ids[row, : len(datum["tokens"])] = torch.tensor(datum["tokens"], dtype=torch.long)
        mask[row, : len(datum["tokens"])] = 1
    return ids, mask


def request_losses(
    request: dict[str, Any], block: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the summed loss, the answer's result: each datum's log-probs and per-token loss,
    and `loss:sum`) of a request from its block of logits, one row per datum."""
    payload = request["payload"]
    total = torch.zeros((), device=device)
    outputs = []
    for row, datum in enumerate(payload["data"]):
        n = len(datum["tokens"])
        loss, logprobs, each = datum_loss(
            payload["loss_fn"], block[row, :n], datum, device, payload.get("loss_fn_config")
        )
        total = total + loss
        outputs.append(
            {
                "logprobs": logprobs.detach().cpu().tolist(),
                "elementwise_loss": each.detach().cpu().tolist(),
            }
        )
    return total, {"outputs": outputs, "metrics": {"loss:sum": float(total.detach())}}


def loss_pass(
    model: nn.Module,
    routing: Routing,
    device: torch.device,
    pad_token_id: int,
    bucket: int,
    requests: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One pass through the base of one or more models' requests (each model's rows through
    its own factors, `Routing.blocks`), each its own losses; the backward of the sum of the
    `forward_backward` ones adds to their own factors' .grad (summed until `optim_step`)."""
    data = [d for r in requests for d in r["payload"]["data"]]
    width = padded_width([len(d["tokens"]) for d in data], bucket)
    ids, mask = request_rows(data, pad_token_id, width)
    routing.blocks = [(r["model_id"], len(r["payload"]["data"])) for r in requests]
    routing.forward_id += 1
    backward = any(r["kind"] == "forward_backward" for r in requests)
    results = []
    with torch.set_grad_enabled(backward):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        trained = torch.zeros((), device=device)
        blocks = logits.split([len(r["payload"]["data"]) for r in requests])
        for request, block in zip(requests, blocks, strict=True):
            total, result = request_losses(request, block, device)
            if request["kind"] == "forward_backward":
                trained = trained + total
            results.append(result)
        if backward:
            trained.backward()
    return results
