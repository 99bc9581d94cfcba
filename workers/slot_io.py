"""A slot's traffic with the object store: publish its adapter, checkpoint it, resume it.

Free functions over a `PackContext` so that a one-shot run and a pack host share them.
Every function is called on every rank (they hold collectives); only rank 0 writes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from core.checkpoint_index import list_checkpoints, prune_checkpoints
from core.objectstore import ObjectStoreConfig, open_object_store
from core.publish import publish_adapter
from workers.host.slot import JobSlot, SlotState
from workers.host.step import PackContext
from workers.lora.packed_layer import load_slot_state
from workers.lora.peft_export import export_peft_adapter
from workers.runtime.memory_report import rank_memory_report
from workers.training.checkpoints import read_checkpoint, write_checkpoint
from workers.training.rng_state import reseed_for, restore_dropout_rng, saved_dropout_rng


def publish_slot(
    ctx: PackContext, slot: JobSlot, paths: list[str], store_config: ObjectStoreConfig
) -> None:
    """Publishes the job's adapter from rank 0 and takes it out of the pack."""
    slot.state = SlotState.DONE
    if ctx.rank == 0:
        started = time.monotonic()  # publish_seconds: the scheduler's histogram
        with tempfile.TemporaryDirectory() as folder:
            export_peft_adapter(ctx.model, slot.spec, paths, Path(folder))
            store = open_object_store(store_config)
            manifest = publish_adapter(
                store, slot.spec.tenant, slot.job_id, slot.spec.attempt, Path(folder)
            )
        publish_seconds = time.monotonic() - started
    # Every rank takes part: the gather is a collective.
    held = partitioning(ctx)
    if ctx.rank == 0:
        ctx.report(
            slot.job_id,
            "published",
            "Adapter published; frozen base bytes held per rank: "
            + ", ".join(f"rank {p['rank']} {p['base_bytes_held']}" for p in held),
            {"files": manifest.files, "partitioning": held, "publish_seconds": publish_seconds},
        )
    dist.barrier()


def checkpoint_slot(
    ctx: PackContext,
    slot: JobSlot,
    paths: list[str],
    store_config: ObjectStoreConfig,
    keep_last: int,
) -> None:
    """Saves the job's factors and training state; rank 0 writes, every rank's RNG is kept."""
    generator = ctx.routing.generators.get(slot.job_id)
    rng: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(rng, generator.get_state() if generator is not None else None)
    if ctx.rank != 0:
        return
    device_type = generator.device.type if generator is not None else ctx.device.type
    state = slot.training_state(dropout_rng=saved_dropout_rng(rng, device_type))
    metrics = {"step": slot.step, "train_loss": slot.last_loss}
    store = open_object_store(store_config)
    with tempfile.TemporaryDirectory() as folder:
        export_peft_adapter(ctx.model, slot.spec, paths, Path(folder))
        info = write_checkpoint(
            store,
            slot.spec.tenant,
            slot.job_id,
            slot.step,
            Path(folder),
            state,
            metrics,
            created_at=int(time.time()),
            attempt=slot.spec.attempt,
        )
    prune_checkpoints(store, slot.spec.tenant, slot.job_id, slot.spec.attempt, keep_last)
    ctx.report(
        slot.job_id,
        "checkpoint",
        f"Checkpoint saved at step {slot.step}",
        {"step": info.step, "metrics": metrics},
    )


def resume_slot(ctx: PackContext, slot: JobSlot, store_config: ObjectStoreConfig) -> None:
    """Continues a job from its newest complete checkpoint, if it has one."""
    store = open_object_store(store_config)
    saved = list_checkpoints(store, slot.spec.tenant, slot.job_id, up_to_attempt=slot.spec.attempt)
    if not saved:
        if slot.spec.start_from:  # a new job forked from another job's checkpoint
            from safetensors.torch import load

            weights = store.get_bytes(slot.spec.start_from + "adapter_model.safetensors")
            load_slot_state(ctx.model, slot.job_id, load(weights))
            ctx.report(
                slot.job_id,
                "message",
                f"Started from checkpoint {slot.spec.start_from_name}",
                {"start_from": slot.spec.start_from_name},
            )
        return
    tensors, state = read_checkpoint(store, saved[0])
    load_slot_state(ctx.model, slot.job_id, tensors)
    slot.restore(state)
    generator = ctx.routing.generators.get(slot.job_id)
    exact = True
    if generator is not None:
        reseed = reseed_for(slot.spec.training.seed, slot.step, ctx.rank)
        exact = restore_dropout_rng(
            generator, state.get("dropout_rng"), ctx.rank, ctx.world_size, reseed
        )
    ctx.report(
        slot.job_id,
        "message",
        f"Resumed from the checkpoint at step {slot.step} of {slot.total_steps}"
        + ("" if exact else " (dropout re-seeded: other devices or world size)"),
        {"resumed_from_step": slot.step, "dropout_rng_exact": exact},
    )


def partitioning(ctx: PackContext) -> list[dict[str, Any]]:
    """What every rank holds of the frozen base, and its memory (a collective)."""
    mine = rank_memory_report(ctx.model, ctx.rank)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    return gathered
