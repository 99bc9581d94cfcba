"""Many LoRA adapters on one frozen linear layer; each sample goes through its own slot.

    rows of slot k:   y = W·x + (alpha_k / r_k) · B_k · A_k · dropout_k(x)
                          └ frozen, shared ┘   └── slot k's own factors ──┘

peft cannot train several adapters in one forward (it refuses `adapter_names` in training
mode, and `set_adapter([a, b])` sums them), so packing has its own small layer. A batch is
built job by job, so each slot owns a contiguous block of rows: one matmul pair per slot,
no loop over samples. The on-disk format stays peft's (see `slot_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class SlotConfig:
    name: str
    r: int
    alpha: float
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


# The route of rows that must see the bare base (e.g. preference tuning's reference pass).
NO_ADAPTER = "<no adapter>"


class Routing:
    """Which rows of the current batch belong to which slot, shared by every packed layer.

    Set once per forward: `blocks` is [(slot name, number of rows)] in batch order, and
    covers every row. A name must be a slot added to some layer, or `NO_ADAPTER`: a typo or
    a slot already removed is an error, never a silent zero delta.
    """

    def __init__(self) -> None:
        self.blocks: list[tuple[str, int]] = []
        self.generators: dict[str, torch.Generator] = {}
        self.slots: set[str] = set()  # every slot added to any layer (and not removed)
        # None: a slot's math that raises fails the forward. A dict (a pack host's step):
        # the slot's exception is kept here and its rows get no delta for the rest of the
        # forward, so the shared forward (a collective under ZeRO-3) goes on for the others.
        self.failures: dict[str, Exception] | None = None
        # Counts the forwards a step makes: a layer called again within the same forward is
        # a recompute in backward (gradient checkpointing), which must redo what it did.
        self.forward_id = 0
        # TEST HOOK (core.fault_injection): slot name -> [the exception its delta raises, how
        # many of its layers run first] (1: it fails mid-forward, in its second layer).
        self.injected: dict[str, list[Any]] = {}


class PackedLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.slots: dict[str, SlotConfig] = {}
        self._ran_in: int | None = None  # the routing's forward this layer last ran in
        self._zeroed: set[str] = set()  # slots it gave no delta in that forward (failed)

    def add_slot(self, slot: SlotConfig, generator: torch.Generator, device: torch.device) -> None:
        """A starts random (as peft: Kaiming-uniform), B at zero: the slot starts as the base."""
        a = torch.empty(slot.r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A[slot.name] = nn.Parameter(a.to(device))
        self.lora_B[slot.name] = nn.Parameter(
            torch.zeros(self.out_features, slot.r, dtype=torch.float32, device=device)
        )
        self.slots[slot.name] = slot
        self.routing.slots.add(slot.name)

    def remove_slot(self, name: str) -> None:
        if name in self.slots:
            del self.lora_A[name], self.lora_B[name], self.slots[name]
            self.routing.slots.discard(name)  # a host removes it from every layer at once

    def _delta(self, name: str, x: torch.Tensor, replay: bool) -> torch.Tensor:
        slot = self.slots[name]  # forward gives rows of slots without factors here no delta
        failures = self.routing.failures
        # A recompute redoes exactly what the forward did (the same tensors saved), and lets
        # every exception through: torch's own early stop of a recompute is one.
        if failures is None or (replay and name not in self._zeroed):
            return self._slot_delta(slot, x)
        if replay or name in failures:
            self._zeroed.add(name)
            return x.new_zeros((*x.shape[:-1], self.out_features), dtype=torch.float32)
        try:
            return self._slot_delta(slot, x)
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures[name] = exc
            self._zeroed.add(name)
            return x.new_zeros((*x.shape[:-1], self.out_features), dtype=torch.float32)

    def _slot_delta(self, slot: SlotConfig, x: torch.Tensor) -> torch.Tensor:
        name = slot.name
        injected = self.routing.injected.get(name)
        if injected is not None:
            if injected[1] == 0:
                raise injected[0]
            injected[1] -= 1
        x = x.to(torch.float32)
        if slot.dropout > 0 and self.training:
            keep = 1.0 - slot.dropout
            mask = torch.empty_like(x).bernoulli_(keep, generator=self.routing.generators.get(name))
            x = x * mask / keep
        return (x @ self.lora_A[name].T @ self.lora_B[name].T) * slot.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        if not self.routing.blocks:
            return result
        sizes = [rows for _, rows in self.routing.blocks]
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"routing covers {sum(sizes)} rows but the batch has {x.shape[0]}")
        for name, _ in self.routing.blocks:
            if name not in self.slots and name != NO_ADAPTER and name not in self.routing.slots:
                raise KeyError(f"routing names {name!r}, which is no slot of this pack")
        if not any(name in self.slots for name, _ in self.routing.blocks):
            # No row's slot adapts this layer (e.g. the output layer, which only Tinker
            # models with train_unembed adapt): the base's output as it is, not an fp32
            # copy of the whole logits.
            return result
        # One split, not a slice per slot: a slice's backward writes its gradient into a
        # zeroed copy of the whole input, once per slot of the pack.
        replay = self._ran_in == self.routing.forward_id
        if not replay:
            self._ran_in, self._zeroed = self.routing.forward_id, set()
        blocks = []
        for (name, _), block, base in zip(
            self.routing.blocks, x.split(sizes), result.split(sizes), strict=True
        ):
            if name not in self.slots:  # the bare base's rows: as they are (+0 is exact)
                blocks.append(base)
                continue
            # Added in fp32 and rounded once, as peft does: rounding the delta to bf16 first
            # and adding in bf16 rounds twice (1 output in 10 one bf16 step off peft's).
            delta = self._delta(name, block, replay)
            blocks.append((base.to(torch.float32) + delta).to(result.dtype))
        return torch.cat(blocks)


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    return module.base_layer if isinstance(module, PackedLoraLinear) else module


def output_layer_path(model: nn.Module) -> str | None:
    """The path of the output layer (the unembedding, `lm_head`) when it is a linear layer:
    what Tinker's `train_unembed` adapts. Never part of "all-linear", as in peft."""
    output = _unwrapped(_output_layer(model))
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear | PackedLoraLinear) and _unwrapped(module) is output:
            return path
    return None


def adaptable_layers(model: nn.Module) -> list[str]:
    """Every layer a pack host wraps: "all-linear" and the output layer (only Tinker models
    asking for `train_unembed` put factors there; job slots cannot target it)."""
    output = output_layer_path(model)
    return sorted([*matching_linear_layers(model, "all-linear"), *([output] if output else [])])


def matching_linear_layers(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Paths of the linear layers a job adapts, as peft matches them ("all-linear": every
    linear layer but the output layer; names match a path or its last components)."""
    output = _unwrapped(_output_layer(model))
    wrapped = {path for path, _ in packed_layers(model)}
    paths = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear | PackedLoraLinear):
            continue
        if path.rpartition(".")[0] in wrapped:  # the frozen layer inside a packed one
            continue
        if target_modules == "all-linear":
            if _unwrapped(module) is not output:
                paths.append(path)
        elif any(path == t or path.endswith(f".{t}") for t in target_modules):
            paths.append(path)
    return sorted(paths)


def wrap_linear_layers(
    model: nn.Module, paths: list[str], routing: Routing
) -> dict[str, PackedLoraLinear]:
    """Replaces each named linear layer by a packed one around it (once; idempotent)."""
    wrapped = {}
    for path in sorted(paths):
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, attribute)
        if not isinstance(module, PackedLoraLinear):
            module = PackedLoraLinear(module, routing)
            setattr(parent, attribute, module)
        wrapped[path] = module
    return wrapped


def packed_layers(model: nn.Module) -> Iterator[tuple[str, PackedLoraLinear]]:
    for path, module in model.named_modules():
        if isinstance(module, PackedLoraLinear):
            yield path, module


def slot_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """A slot's factors in a fixed order (sorted by layer path), identical on every rank."""
    params: list[nn.Parameter] = []
    for _, layer in sorted(packed_layers(model), key=lambda item: item[0]):
        if name in layer.slots:
            params += [layer.lora_A[name], layer.lora_B[name]]
    return params


def slot_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The slot's factors under peft's key names, exactly as if it had been trained alone."""
    state = {}
    for path, layer in packed_layers(model):
        if name in layer.slots:
            prefix = f"base_model.model.{path}"
            state[f"{prefix}.lora_A.weight"] = layer.lora_A[name].detach().cpu().clone()
            state[f"{prefix}.lora_B.weight"] = layer.lora_B[name].detach().cpu().clone()
    return state


def target_module_names(paths: list[str]) -> list[str]:
    """The layer names peft records in adapter_config.json (last path component)."""
    return sorted({path.rpartition(".")[2] for path in paths})


def load_slot_state(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Puts a slot's factors back from peft-named tensors (a checkpoint of the job)."""
    expected = slot_state_dict(model, name).keys()
    if set(tensors) != set(expected):
        raise ValueError(f"checkpoint of {name} does not fit its layers")
    with torch.no_grad():
        for path, layer in packed_layers(model):
            if name in layer.slots:
                prefix = f"base_model.model.{path}"
                layer.lora_A[name].copy_(tensors[f"{prefix}.lora_A.weight"])
                layer.lora_B[name].copy_(tensors[f"{prefix}.lora_B.weight"])
