"""What a job slot trains its rows for: one step mechanism (workers/host/step.py), two
policies. Supervised: the next-token loss on its rows. Preference (DPO): each pair puts
its preferred and its non-preferred completion through the base; a reference pass without
gradient first gives the reference's log-probs of the same rows, from the base with the
job's own delta skipped (rows routed to NO_ADAPTER) or, for a job started from a
checkpoint, from a frozen slot holding that checkpoint's factors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from core.spec import JobSpec
from workers.data.tokenization import TokenizedExample
from workers.lora.packed_layer import NO_ADAPTER, PackedLoraLinear, SlotConfig
from workers.training.chunked_loss import chunked_next_token_loss
from workers.training.preference_loss import REWARD_METRICS, dpo_loss, sequence_logprobs


def reference_slot_name(job_id: str) -> str:
    """The frozen slot a DPO job started from a checkpoint keeps as its reference."""
    return f"{job_id}/reference"


class Objective(Protocol):
    @property
    def reference_route(self) -> str | None:
        """The route of the reference pass (a slot name, or NO_ADAPTER); None: none."""
        ...

    @property
    def stat_names(self) -> tuple[str, ...]:
        """What `loss`'s statistics are called in the job's metrics event (rank means)."""
        ...

    def rows(self, examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        """The rows a micro-batch of examples puts through the base, in order."""
        ...

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        reference: torch.Tensor | None,
        chunk_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the job's loss on its block of logits, its statistics [len(stat_names)])."""
        ...


@dataclass(frozen=True)
class Supervised:
    reference_route: str | None = None
    stat_names: tuple[str, ...] = ()

    def rows(self, examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        return list(examples)

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        reference: torch.Tensor | None,
        chunk_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = chunked_next_token_loss(logits, labels, chunk_tokens)
        return loss, loss.new_zeros((0,))


@dataclass(frozen=True)
class Preference:
    beta: float
    reference_route: str | None = NO_ADAPTER
    stat_names: tuple[str, ...] = REWARD_METRICS

    def rows(self, examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        """Every pair's preferred row, then every pair's non-preferred row."""
        rejected = [e.rejected for e in examples]
        if any(r is None for r in rejected):
            raise ValueError("a DPO job's examples must all be preference pairs")
        return [*examples, *(r for r in rejected if r is not None)]

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        reference: torch.Tensor | None,
        chunk_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            raise ValueError("a DPO step needs the reference pass's log-probs")
        policy = sequence_logprobs(logits, labels, chunk_tokens)
        pairs = policy.shape[0] // 2
        return dpo_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta
        )


def objective_for(spec: JobSpec) -> Objective:
    preference = spec.training.preference
    if preference is None:
        return Supervised()
    # Started from a checkpoint: the reference is that checkpoint, not the bare base.
    route = reference_slot_name(spec.job_id) if spec.start_from else NO_ADAPTER
    return Preference(beta=preference.beta, reference_route=route)


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int
) -> torch.Tensor:
    """[rows]: summed log-probs of each row's counted tokens, with no gradient (the routing
    already names each block's reference)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"], chunk_tokens)


def add_reference_slot(
    layers: Sequence[PackedLoraLinear],
    config: SlotConfig,
    device: torch.device,
) -> None:
    """A frozen copy of the job's slot shape (no dropout: the reference is deterministic),
    to be loaded with its start checkpoint's factors; never trained."""
    frozen = SlotConfig(
        name=reference_slot_name(config.name), r=config.r, alpha=config.alpha, dropout=0.0
    )
    generator = torch.Generator().manual_seed(0)  # overwritten by the checkpoint
    for layer in layers:
        layer.add_slot(frozen, generator, device)
        layer.lora_A[frozen.name].requires_grad_(False)
        layer.lora_B[frozen.name].requires_grad_(False)
