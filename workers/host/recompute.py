"""Gradient checkpointing for a pack (workers.host.step): each decoder layer recomputed in
backward, each job's LoRA dropout replayed as its forward drew it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from workers.lora.packed_layer import Routing


def use_gradient_checkpointing(model: nn.Module, routing: Routing) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (less
    memory per job, one more forward per layer). Non-reentrant: ZeRO-3's module hooks gather
    the layer's shards again for the recompute. Each job's LoRA dropout draws from its own
    generator, which torch's checkpoint does not rewind: the recompute replays the draws of
    the forward, so the masks (and gradients) are those of a step without checkpointing."""
    model.activation_checkpointing_enable(  # type: ignore[operator]
        activation_checkpointing_kwargs={
            "use_reentrant": False,
            "context_fn": lambda: _replay_dropout(routing.generators),
        }
    )


def _replay_dropout(
    generators: dict[str, torch.Generator],
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """(forward context, recompute context) of one checkpointed layer call."""
    before = {name: g.get_state() for name, g in generators.items()}

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after = {name: g.get_state() for name, g in generators.items()}
        for name, state in before.items():
            generators[name].set_state(state)
        try:
            yield
        finally:
            for name, state in after.items():
                generators[name].set_state(state)

    return contextlib.nullcontext(), recompute()
