"""One training run of a pack of 1..K jobs on one base model, as seen from one Ray Train worker.

Lifecycle: setup (each job's data; the base loaded already partitioned by ZeRO-3; the
packed LoRA layers and one slot per job) → train (each step: one forward of every active
job's micro-batch through the shared base, the sum of each job's own mean loss, gradients
averaged across ranks, then each job's own clip/optimizer/schedule step; a job whose steps
are done is published and leaves) → cleanup.

The frozen base is DeepSpeed ZeRO-3's: partitioned across ranks and gathered layer by
layer in forward and backward, once per step for all jobs. The LoRA factors are small and
stay whole on every rank, outside DeepSpeed, so each job keeps an optimizer of its own.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.checkpoint_index import list_checkpoints, prune_checkpoints
from core.objectstore import open_object_store
from core.publish import publish_adapter
from core.spec import RunSpec
from workers.base_models import resolve_base_model
from workers.checkpoints import read_checkpoint, write_checkpoint
from workers.data_parallel import average_gradients
from workers.deepspeed_config import build_deepspeed_config
from workers.job_slot import JobSlot, SlotState, load_job_slot
from workers.memory_report import rank_memory_report
from workers.packed_lora import (
    Routing,
    load_slot_state,
    matching_linear_layers,
    slot_parameters,
    wrap_linear_layers,
)
from workers.peft_export import export_peft_adapter
from workers.tokenization import IGNORE_INDEX, collate

DROPOUT_STREAM, INIT_STREAM = 1, 2


class PackTrainingRecipe:
    def __init__(self, spec: RunSpec, reporter: Any) -> None:
        self.spec = spec
        self.reporter = reporter  # the run's actor; only rank 0 talks to it
        self.slots: list[JobSlot] = []
        self.routing = Routing()

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_jobs()
        self._setup_base()
        self._setup_slots()

    def _setup_distributed(self) -> None:
        import deepspeed
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        if self.spec.use_gpu:
            self.device = torch.device("cuda", context.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Ray Train already created the process group; DeepSpeed adopts it as it is.
        deepspeed.init_distributed(dist_backend="nccl" if self.spec.use_gpu else "gloo")
        self.dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float32
        first = self.spec.jobs[0]
        self.base_path = resolve_base_model(
            first.base_model_uri, self.spec.model_cache_dir, self.spec.object_store
        )

    def _setup_jobs(self) -> None:
        """Loads every job's data; a job whose data fails leaves the pack, failed, alone."""
        import ray
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        store = open_object_store(self.spec.object_store)
        # After a worker failure Ray Train calls us again: jobs that already ended in this
        # run (published, cancelled, failed) stay ended; the others resume from checkpoints.
        box: list[Any] = [ray.get(self.reporter.begin_attempt.remote()) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self.restart, running = box[0]["restart"], set(box[0]["running"])
        if self.restart:
            self._report(
                None,
                "message",
                f"Workers restarted after a failure (restart {self.restart} of "
                f"{self.spec.max_worker_restarts}); resuming from checkpoints",
                {"restart": self.restart},
            )
        for job in sorted(self.spec.jobs, key=lambda j: j.job_id):
            if job.job_id not in running:
                continue
            try:
                self.slots.append(load_job_slot(job, store, self.tokenizer, self.world_size))
            except Exception as exc:  # the data is the same on every rank: all agree
                self._report_job_failure(job.job_id, exc)

    def _setup_base(self) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        self.ds_config = build_deepspeed_config(
            micro_batch_per_rank=max((s.micro_batch for s in self.slots), default=1),
            precision=self.spec.precision,
            param_persistence_threshold=self.spec.zero3_param_persistence_threshold,
        )
        # Kept alive on purpose: while it exists, from_pretrained loads under zero.Init, so
        # every rank only ever materialises its own shard of the base.
        self._hf_deepspeed_config = HfDeepSpeedConfig(self.ds_config)
        base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        base.requires_grad_(False)
        # No optimizer: DeepSpeed only partitions the frozen base and gathers it on use.
        self.engine, *_ = deepspeed.initialize(model=base, config=self.ds_config)
        self.model = self.engine.module

    def _setup_slots(self) -> None:
        """Wraps the union of the jobs' target layers; each job gets factors where it asked."""
        wanted = {}
        for slot in list(self.slots):
            lora = slot.spec.lora
            target = lora.target_modules
            paths = matching_linear_layers(
                self.model, target if isinstance(target, str) else list(target)
            )
            if not paths:
                self._fail_slot(
                    slot, ValueError(f"target_modules {target!r} match no linear layer")
                )
                continue
            wanted[slot.job_id] = paths
        layers = wrap_linear_layers(
            self.model, sorted({p for ps in wanted.values() for p in ps}), self.routing
        )
        for slot in self.slots:
            if slot.state is not SlotState.TRAINING:
                continue
            init = slot.generator(INIT_STREAM)
            for path in wanted[slot.job_id]:
                layers[path].add_slot(slot.config, init, self.device)
            slot.setup_optimizer(slot_parameters(self.model, slot.job_id))
            if slot.spec.lora.dropout > 0:
                self.routing.generators[slot.job_id] = slot.generator(DROPOUT_STREAM, self.device)
            self._resume(slot)
            self._report(
                slot.job_id,
                "message",
                f"Training started: {slot.total_steps} steps on {self.world_size} workers "
                f"({self.spec.precision}), {len(slot.examples)} examples, "
                f"packed with {len(self.slots) - 1} other job(s)",
                {
                    "total_steps": slot.total_steps,
                    "workers": self.world_size,
                    "pack_size": len(self.slots),
                },
            )
        self.paths = wanted

    # ---- reporting ---------------------------------------------------------------------
    def _report(
        self, job_id: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        if self.rank == 0:
            self.reporter.record.remote(
                {"job_id": job_id, "type": kind, "message": message, "data": data}
            )

    def _report_job_failure(self, job_id: str, exc: BaseException) -> None:
        self._report(
            job_id,
            "job_failed",
            f"Training failed: {type(exc).__name__}: {exc}",
            {"error": str(exc)},
        )

    def _fail_slot(self, slot: JobSlot, exc: BaseException) -> None:
        slot.state = SlotState.FAILED
        self._report_job_failure(slot.job_id, exc)

    # ---- train -------------------------------------------------------------------------
    def _stop_requests(self) -> set[str]:
        """Rank 0 asks the run's actor which jobs to stop; every rank must agree on it."""
        import ray

        box: list[Any] = [
            sorted(ray.get(self.reporter.stop_requests.remote())) if self.rank == 0 else None
        ]
        dist.broadcast_object_list(box, src=0)
        return set(box[0])

    def active(self) -> list[JobSlot]:
        return [s for s in self.slots if s.state is SlotState.TRAINING]

    def train(self) -> None:
        self.model.train()
        while True:
            stop = self._stop_requests()
            for slot in self.active():
                if slot.job_id in stop or "*" in stop:
                    slot.state = SlotState.CANCELLED
                    self._report(slot.job_id, "job_cancelled", "Training stopped: job cancelled")
            active = self.active()
            if not active:
                break
            self._step(active)
            for slot in active:
                if slot.state is not SlotState.TRAINING:
                    continue
                if slot.step == slot.total_steps:
                    self._finish(slot)
                elif slot.checkpoint_due(self.spec.checkpoint_every_steps):
                    self._checkpoint(slot)

    def _step(self, active: list[JobSlot]) -> None:
        started = time.perf_counter()
        shards = [slot.next_micro_batch(self.rank, self.world_size) for slot in active]
        self.routing.blocks = [
            (slot.job_id, len(shard)) for slot, shard in zip(active, shards, strict=True)
        ]
        batch = collate([e for shard in shards for e in shard], self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # The module itself, not the engine: the engine's forward/backward are built around an
        # optimizer it owns; ZeRO-3's gather/release hooks live on the module and still run.
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        # Each job's own mean loss over its own tokens; their sum keeps gradients apart.
        losses, start = [], 0
        for _, rows in self.routing.blocks:
            block = slice(start, start + rows)
            losses.append(
                F.cross_entropy(
                    logits[block, :-1].float().flatten(0, 1),
                    batch["labels"][block, 1:].flatten(),
                    ignore_index=IGNORE_INDEX,
                )
            )
            start += rows
        forward_done = time.perf_counter()
        torch.stack(losses).sum().backward()
        backward_done = time.perf_counter()
        average_gradients([p for slot in active for p in slot.params], self.world_size)
        sync_done = time.perf_counter()
        norms = [slot.apply_gradients() for slot in active]
        elapsed = time.perf_counter() - started
        phases = {
            "forward": forward_done - started,
            "backward": backward_done - forward_done,
            "gradient_sync": sync_done - backward_done,
            "optimizer": elapsed - (sync_done - started),
        }
        tokens = [float(batch["attention_mask"][b : b + n].sum()) for b, n in self._offsets()]
        totals = torch.tensor(
            [[loss.item(), t] for loss, t in zip(losses, tokens, strict=True)], device=self.device
        )
        dist.all_reduce(totals)
        pack_tokens = float(totals[:, 1].sum())
        for slot, (loss_sum, slot_tokens), norm in zip(active, totals.tolist(), norms, strict=True):
            mean_loss = loss_sum / self.world_size
            slot.trained_tokens += int(slot_tokens)
            slot.last_loss = mean_loss
            if not math.isfinite(mean_loss):
                self._fail_slot(
                    slot,
                    FloatingPointError(f"training loss became {mean_loss} at step {slot.step}"),
                )
                continue
            self._report(
                slot.job_id,
                "metrics",
                f"Step {slot.step}/{slot.total_steps}: training loss={mean_loss:.4f}",
                {
                    "step": slot.step,
                    "total_steps": slot.total_steps,
                    "train_loss": mean_loss,
                    "learning_rate": slot.learning_rate,
                    "grad_norm": norm,
                    "tokens_per_second": slot_tokens / elapsed,
                    "pack_tokens_per_second": pack_tokens / elapsed,
                    "pack_size": len(active),
                    "step_seconds": elapsed,
                    "phase_seconds": phases,
                    "trained_tokens": slot.trained_tokens,
                },
            )

    def _offsets(self) -> list[tuple[int, int]]:
        offsets, start = [], 0
        for _, rows in self.routing.blocks:
            offsets.append((start, rows))
            start += rows
        return offsets

    def _finish(self, slot: JobSlot) -> None:
        """Publishes the job's adapter from rank 0 and takes it out of the pack."""
        slot.state = SlotState.DONE
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                export_peft_adapter(self.model, slot.spec, self.paths[slot.job_id], Path(folder))
                store = open_object_store(self.spec.object_store)
                manifest = publish_adapter(
                    store, slot.spec.tenant, slot.job_id, slot.spec.attempt, Path(folder)
                )
        # Every rank takes part: the gather is a collective.
        partitioning = self._partitioning()
        if self.rank == 0:
            self._report(
                slot.job_id,
                "published",
                "Adapter published; frozen base bytes held per rank: "
                + ", ".join(f"rank {p['rank']} {p['base_bytes_held']}" for p in partitioning),
                {"files": manifest.files, "partitioning": partitioning},
            )
        dist.barrier()

    def _checkpoint(self, slot: JobSlot) -> None:
        """Saves the job's factors and training state; rank 0 writes, every rank's RNG is kept."""
        generator = self.routing.generators.get(slot.job_id)
        rng: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng, generator.get_state() if generator is not None else None)
        if self.rank != 0:
            return
        state = slot.training_state(dropout_rng=rng)
        metrics = {"step": slot.step, "train_loss": slot.last_loss}
        store = open_object_store(self.spec.object_store)
        with tempfile.TemporaryDirectory() as folder:
            export_peft_adapter(self.model, slot.spec, self.paths[slot.job_id], Path(folder))
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
        prune_checkpoints(
            store, slot.spec.tenant, slot.job_id, slot.spec.attempt, self.spec.checkpoint_keep_last
        )
        self._report(
            slot.job_id,
            "checkpoint",
            f"Checkpoint saved at step {slot.step}",
            {"step": info.step, "metrics": metrics},
        )

    def _resume(self, slot: JobSlot) -> None:
        """Continues a job from its newest complete checkpoint, if it has one."""
        store = open_object_store(self.spec.object_store)
        saved = list_checkpoints(
            store, slot.spec.tenant, slot.job_id, up_to_attempt=slot.spec.attempt
        )
        if not saved:
            if slot.spec.start_from:  # a new job forked from another job's checkpoint
                from safetensors.torch import load

                weights = store.get_bytes(slot.spec.start_from + "adapter_model.safetensors")
                load_slot_state(self.model, slot.job_id, load(weights))
                self._report(
                    slot.job_id,
                    "message",
                    f"Started from checkpoint {slot.spec.start_from_name}",
                    {"start_from": slot.spec.start_from_name},
                )
            return
        tensors, state = read_checkpoint(store, saved[0])
        load_slot_state(self.model, slot.job_id, tensors)
        slot.restore(state)
        generator = self.routing.generators.get(slot.job_id)
        if generator is not None and state["dropout_rng"][self.rank] is not None:
            generator.set_state(state["dropout_rng"][self.rank])
        self._report(
            slot.job_id,
            "message",
            f"Resumed from the checkpoint at step {slot.step} of {slot.total_steps}",
            {"resumed_from_step": slot.step},
        )

    def _partitioning(self) -> list[dict[str, Any]]:
        """What every rank holds of the frozen base, and its memory (a collective)."""
        mine = rank_memory_report(self.model, self.rank)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def cleanup(self) -> None:
        del self.engine, self.model, self._hf_deepspeed_config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    recipe = PackTrainingRecipe(config["spec"], config["reporter"])
    recipe.setup()
    recipe.train()
    recipe.cleanup()
