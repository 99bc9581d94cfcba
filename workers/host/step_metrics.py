"""A pack step's metrics (workers.host.step): each job's token accuracy, every job's sums
agreed across the ranks in one all-reduce, and the data of each job's metrics event."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workers.host.failures import StepFailures
from workers.host.slot import JobSlot
from workers.training.chunked_loss import chunked_token_accuracy


def job_accuracy(
    slot: JobSlot,
    block: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    chunk_tokens: int,
    failures: StepFailures,
    tokens: dict[str, torch.Tensor],
    right: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """The job's tokens and train_mean_token_accuracy's counts, from its block of logits,
    chunk by chunk, without gradient; a failure here fails the job alone ("metrics")."""
    logits, labels, mask = block
    try:
        tokens[slot.job_id] = mask.sum()
        right[slot.job_id] = chunked_token_accuracy(logits, labels, chunk_tokens)
    except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
        failures.add(slot.job_id, "metrics", exc)


def summed_totals(
    trained: list[JobSlot],
    failures: StepFailures,
    device: torch.device,
    losses: dict[str, torch.Tensor],
    tokens: dict[str, torch.Tensor],
    right: dict[str, tuple[torch.Tensor, torch.Tensor]],
    stats: dict[str, torch.Tensor],
) -> list[list[float]]:
    """Per job, summed over the ranks: [loss, tokens, failed since the gradient sync, tokens
    right, tokens counted, *its objective's statistics]. Every job's row in one tensor: one
    all-reduce and one sync; each job's objective adds its own statistics, so rows differ in
    length (the same lengths on every rank: the step checks each job's statistics' shape)."""
    per_job = [
        torch.cat(
            [
                torch.stack(
                    [
                        losses[s.job_id].detach().float(),
                        tokens[s.job_id].float(),
                        torch.tensor(float(s.job_id in failures.caught), device=device),
                        right[s.job_id][0].float(),
                        right[s.job_id][1].float(),
                    ]
                ),
                stats[s.job_id].float(),
            ]
        )
        for s in trained
    ]
    totals = torch.cat(per_job)
    dist.all_reduce(totals)
    return [row.tolist() for row in totals.split([len(row) for row in per_job])]


def metrics_data(
    slot: JobSlot,
    row: list[float],
    *,
    world_size: int,
    norm: float,
    timing: tuple[float, dict[str, float]],
    pack: tuple[float, int],
    device_seconds: float,
    dtypes: dict[str, str] | None,
) -> dict[str, Any]:
    """The data of the job's metrics event for the step it just took, from its summed row
    (`summed_totals`); `timing`: (the step's seconds, per phase); `pack`: (the pack's tokens,
    its number of jobs); `dtypes`: with its first step only."""
    _, slot_tokens, _, _, _, *stat_sums = row
    elapsed, phases = timing
    pack_tokens, pack_size = pack
    return {
        "step": slot.step,
        "total_steps": slot.total_steps,
        "train_loss": slot.last_loss,
        "train_mean_token_accuracy": slot.last_accuracy,
        "learning_rate": slot.learning_rate,
        "grad_norm": norm,
        "tokens_per_second": slot_tokens / elapsed,
        "pack_tokens_per_second": pack_tokens / elapsed,
        "pack_size": pack_size,
        "step_seconds": elapsed,
        "phase_seconds": phases,
        "trained_tokens": slot.trained_tokens,
        "step_tokens": int(slot_tokens),
        "device_seconds": device_seconds,
        # Means over the ranks' equal shares of pairs: the whole batch's means.
        **{
            name: value / world_size
            for name, value in zip(slot.objective.stat_names, stat_sums, strict=True)
        },
        **({"dtypes": dtypes} if dtypes is not None else {}),
    }


def dtypes_of(model: nn.Module, slot: JobSlot, loss: torch.Tensor) -> dict[str, str]:
    """What the job really trains in (reported with its first step): the frozen base in the
    run's precision; its LoRA factors, their gradients, Adam's state and the loss in fp32."""
    base = next(p for name, p in model.named_parameters() if ".lora_" not in name)
    factor = slot.params[0]
    return {
        "base": str(base.dtype).removeprefix("torch."),
        "lora": str(factor.dtype).removeprefix("torch."),
        "lora_grad": str(factor.grad.dtype).removeprefix("torch.")
        if factor.grad is not None
        else "none",
        "loss": str(loss.dtype).removeprefix("torch."),
    }


def with_adam(dtypes: dict[str, str], slot: JobSlot) -> dict[str, str]:
    assert slot.optimizer is not None
    state = slot.optimizer.state.get(slot.params[0], {})
    moment = state.get("exp_avg")
    return {
        **dtypes,
        "adam_state": str(moment.dtype).removeprefix("torch.") if moment is not None else "none",
    }
