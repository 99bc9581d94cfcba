"""What a Tinker model (a request-driven slot, issue 21) asks of each rank of its pack host,
in the terms admission counts a job slot in (core.memory_estimate.SlotDemand): its LoRA
factors, their gradients and AdamW's two moments from its rank and `train_*` flags, and the
activations of its forward work by rows × width.

A Tinker model names no batch ahead: its rows and width are the largest forward work it has
sent (its host counts them, workers.host.requests); a model that has sent none yet (a new one
being placed) is counted by its LoRA state only. Every rank runs all of a request's rows, so
its rows are its rows per rank. Pure, like the estimate: the scheduler and the host share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.memory_estimate import SlotDemand

# The layers the SDK's flags adapt (Llama/Qwen-style names, as peft matches them); the
# output layer (`lm_head`) is `train_unembed`'s.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def tinker_targets(lora: Mapping[str, Any]) -> tuple[str, ...]:
    """The linear layers (by name) a Tinker model's LoRA adapts, but the output layer."""
    return (ATTENTION if lora.get("train_attn", True) else ()) + (
        MLP if lora.get("train_mlp", True) else ()
    )


def tinker_demand(lora: Mapping[str, Any], rows: int = 0, width: int = 0) -> SlotDemand:
    """A Tinker model's slot as admission counts it: `lora` as created (rank, train_mlp,
    train_attn, train_unembed; the SDK's defaults are all true), `rows` × `width` its largest
    forward work (0: none yet)."""
    return SlotDemand(
        rows_per_rank=max(0, rows),
        seq_len=max(0, width),
        lora_r=int(lora["rank"]),
        target_modules=tinker_targets(lora),
        adapts_output=bool(lora.get("train_unembed", True)),
    )


def reported_demands(models: Mapping[str, Mapping[str, Any]] | None) -> list[SlotDemand]:
    """The Tinker models a host reports (`HostReport.request_models`), as demands."""
    return [
        tinker_demand(m["lora"], int(m.get("rows", 0)), int(m.get("width", 0)))
        for _, m in sorted((models or {}).items())
    ]
