"""A Tinker model's weights in the object store (issue 21): saved as a PEFT adapter (and,
asked, its optimizer's state) under a store prefix, loaded back, and moved whole (factors,
AdamW, summed gradients) when a drain or a host's end relocates it (workers.host.slot_moves).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.objectstore import ObjectStore
from workers.host.request_slot import RequestError, RequestSlot
from workers.host.slot_moves import GRADS, grads_bytes, put_grads
from workers.lora.packed_layer import load_slot_state, slot_state_dict, target_module_names


class RequestWeights:
    """The weights half of `workers.host.request_slots.RequestSlots` (which sets these)."""

    model: nn.Module
    rank: int
    store: Callable[[], ObjectStore] | None
    slots: dict[str, RequestSlot]

    def _slot(self, model_id: str) -> RequestSlot:
        raise NotImplementedError

    def _create(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _drop(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # ---- weights: a PEFT adapter (+ the optimizer's state) under a store prefix -----------
    def _save(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 writes the slot's factors as a PEFT adapter (and, asked, the optimizer's
        state), then `lorafleet.json` last: a prefix with it is a whole checkpoint."""
        slot = self._slot(model_id)
        if self.rank == 0:
            assert self.store is not None, "this host has no object store"
            store, prefix = self.store(), payload["prefix"]
            from safetensors.torch import save

            tensors = slot_state_dict(self.model, model_id)
            store.put_bytes(prefix + "adapter_model.safetensors", save(tensors, {"format": "pt"}))
            store.put_bytes(prefix + "adapter_config.json", _peft_config(slot, payload))
            if payload["optimizer"] and slot.optimizer is not None:
                buffer = io.BytesIO()
                torch.save({"optimizer": slot.optimizer.state_dict(), "steps": slot.steps}, buffer)
                store.put_bytes(prefix + "optimizer.pt", buffer.getvalue())
            about = {"model_id": model_id, "base_model": payload["base_model"], **payload["lora"]}
            store.put_bytes(prefix + "lorafleet.json", json.dumps(about).encode())
        return {"path": payload["path"]}

    def _load(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Puts a saved checkpoint's factors (and, asked, its optimizer state) into the slot;
        with `create`, makes the slot first (the SDK's `create_training_client_from_state`)."""
        if payload.get("create") is not None and model_id not in self.slots:
            self._create(model_id, {"lora": payload["create"]})
        slot = self._slot(model_id)
        assert self.store is not None, "this host has no object store"
        store, prefix = self.store(), payload["prefix"]
        from safetensors.torch import load

        load_slot_state(
            self.model, model_id, load(store.get_bytes(prefix + "adapter_model.safetensors"))
        )
        for param in slot.params:
            param.grad = None
        slot.optimizer = None  # weights only: the optimizer starts afresh
        if payload["optimizer"]:
            if not store.exists(prefix + "optimizer.pt"):
                raise RequestError(f"{payload['path']} holds no optimizer state")
            state = torch.load(
                io.BytesIO(store.get_bytes(prefix + "optimizer.pt")), weights_only=True
            )
            slot.optimizer = torch.optim.AdamW(slot.params)
            slot.optimizer.load_state_dict(state["optimizer"])
            slot.steps = state["steps"]
        return {"path": payload["path"], "model_id": model_id}

    def _relocate(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Writes the slot's whole state (factors, AdamW, summed gradients) under the model's
        relocation prefix, then frees the slot: another host restores it from there."""
        slot = self._slot(model_id)
        if self.rank == 0:
            assert self.store is not None, "this host has no object store"
            store, prefix = self.store(), payload["prefix"]
            store.put_bytes(prefix + GRADS, grads_bytes(slot.params))
            if slot.optimizer is None and store.exists(prefix + "optimizer.pt"):
                store.delete(prefix + "optimizer.pt")  # an earlier move's: not this state's
        self._save(model_id, {**payload, "optimizer": True})  # lorafleet.json is written last
        self._drop(model_id, {})
        return {"path": payload["path"], "prefix": payload["prefix"]}

    def _restore(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Makes the slot again from a relocation (or the client's own saved state): its
        factors, its optimizer state when saved, and its summed gradients when saved."""
        assert self.store is not None, "this host has no object store"
        store, prefix = self.store(), payload["prefix"]
        optimizer = store.exists(prefix + "optimizer.pt")
        self._load(model_id, {**payload, "optimizer": optimizer, "create": payload["lora"]})
        if store.exists(prefix + GRADS):
            put_grads(self._slot(model_id).params, store.get_bytes(prefix + GRADS))
        return {"path": payload["path"], "model_id": model_id}


def _peft_config(slot: RequestSlot, payload: dict[str, Any]) -> bytes:
    """adapter_config.json as peft writes it for these factors (with `train_unembed`,
    `lm_head` is among the target modules: peft loads it; see README for vLLM)."""
    return json.dumps(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": payload["base_model"],
            "r": slot.config.r,
            "lora_alpha": slot.config.alpha,
            "lora_dropout": 0.0,
            "target_modules": target_module_names(slot.paths),
            "bias": "none",
            "inference_mode": True,
        },
        indent=2,
    ).encode()
