"""A pack host as seen from one Ray Train worker: load the base once, then train whichever
jobs the host actor hands over, step after step, until the host ends.

Lifecycle: setup (the base loaded already partitioned by ZeRO-3; every linear layer wrapped
once, so a join never re-wraps the model) → serve (at each step boundary: one call from
rank 0 to the host actor, carrying the step's events and bringing the membership changes,
broadcast to every rank; joins are two-phase: every rank loads the job's data in a thread,
the ranks agree with one all-reduce, the slot goes live at the same step everywhere; then
one step over the live slots) → cleanup. A slot that leaves frees its factors, optimizer
and data; its adapter is published by rank 0's background writer.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from core.checkpoint_index import list_checkpoints
from core.host_protocol import HostSpec, host_actor_name
from core.objectstore import open_object_store
from core.spec import JobSpec
from workers.base_models import resolve_base_model
from workers.checkpoints import read_checkpoint
from workers.deepspeed_config import build_deepspeed_config
from workers.deepspeed_ops import use_prebuilt_ops
from workers.job_slot import JobSlot, SlotState, load_job_slot
from workers.memory_report import rank_memory_report
from workers.pack_step import PackContext, train_step, use_gradient_checkpointing
from workers.packed_lora import (
    Routing,
    load_slot_state,
    matching_linear_layers,
    packed_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)
from workers.placement_groups import record_placement_group
from workers.recipe import DROPOUT_STREAM, INIT_STREAM
from workers.rng_state import reseed_for, restore_dropout_rng, saved_dropout_rng
from workers.slot_io import partitioning
from workers.slot_writer import SlotWriter

IDLE_POLL_SECONDS = 0.05  # how often an idle host asks for work
# An idle host holds back jobs that loaded while others announced with them still load (at
# most this long): jobs that arrive together start in one pack, and nobody waits on them.
JOIN_TOGETHER_SECONDS = 5.0


@dataclass
class PendingJoin:
    """A job announced to the workers and loading on this rank, not yet live."""

    job: JobSpec
    slot: JobSlot | None = None
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    start_weights: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class HostWorker:
    def __init__(self, spec: HostSpec, host: Any) -> None:
        self.spec = spec
        self.host = host  # the host's actor; only rank 0 talks to it
        self.routing = Routing()
        self.slots: list[JobSlot] = []
        self.paths: dict[str, list[str]] = {}
        self.pending: dict[str, PendingJoin] = {}
        self._holding_since: float | None = None  # idle, holding loaded joins back (rank 0)
        self.outbox: list[dict[str, Any]] = []
        self._outbox_lock = threading.Lock()
        self.steps = 0
        self.last_step_at: float | None = None
        self.peak_bytes = 0

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> bool:
        """Loads the base; False when the host actor says the host should end instead."""
        self._setup_distributed()
        self._setup_base()
        self.writer = (
            SlotWriter(self.spec.object_store, self.spec.checkpoint_keep_last, self._report)
            if self.rank == 0
            else None
        )
        pids: list[Any] = [None] * self.world_size
        dist.all_gather_object(pids, os.getpid())
        box: list[Any] = [None]
        if self.rank == 0:
            import ray

            # So that the scheduler can free it should Ray not (workers/placement_groups.py).
            record_placement_group(host_actor_name(self.spec.host_id))
            box[0] = ray.get(self.host.begin_attempt.remote(pids))
        dist.broadcast_object_list(box, src=0)
        return not box[0]["end"]

    def _setup_distributed(self) -> None:
        import deepspeed
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        shape = self.spec.shape
        # Ray Train's own device assignment (GPUs a node lends need not be numbered 0…).
        self.device = ray.train.torch.get_device() if shape.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Never compile or wait on a build lock here (workers/deepspeed_ops.py).
        use_prebuilt_ops()
        # Ray Train already created the process group; DeepSpeed adopts it as it is.
        deepspeed.init_distributed(dist_backend="nccl" if shape.use_gpu else "gloo")
        self.dtype = torch.bfloat16 if shape.precision == "bf16" else torch.float32
        self.base_path = resolve_base_model(
            shape.base_model_uri, self.spec.model_cache_dir, self.spec.object_store
        )

    def _setup_base(self) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ds_config = build_deepspeed_config(
            micro_batch_per_rank=1,  # DeepSpeed only partitions the base: no batch of its own
            precision=self.spec.shape.precision,
            param_persistence_threshold=self.spec.zero3_param_persistence_threshold,
        )
        # Kept alive on purpose: while it exists, from_pretrained loads under zero.Init.
        self._hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
        base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        base.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=base, config=ds_config)
        self.model = self.engine.module
        if self.spec.gradient_checkpointing:
            use_gradient_checkpointing(self.model, self.routing)
        # Every layer a job may target, wrapped once: a slot only gets factors where asked.
        self.layers = wrap_linear_layers(
            self.model, matching_linear_layers(self.model, "all-linear"), self.routing
        )
        self.base_bytes = rank_memory_report(self.model, self.rank)["base_bytes_held"]
        self.ctx = PackContext(
            model=self.model,
            routing=self.routing,
            pad_token_id=self.tokenizer.pad_token_id,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            report=self._report,
            loss_chunk_tokens=self.spec.loss_chunk_tokens,
        )

    # ---- reporting: events wait in the outbox for the next step boundary -----------------
    def _report(
        self, job_id: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        if self.rank != 0:
            return
        stamped = {"time": time.time(), **(data or {})}
        event = {"job_id": job_id, "type": kind, "message": message, "data": stamped}
        with self._outbox_lock:
            self.outbox.append(event)

    def _status(self) -> dict[str, Any]:
        slot_bytes = {s.job_id: 4 * 4 * sum(p.numel() for p in s.params) for s in self.slots}
        lora_held = sum(
            4 * p.numel()
            for _, layer in packed_layers(self.model)
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]
        )
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            import psutil

            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
        return {
            "stepped": self.last_step_at is not None,
            "step": self.steps,
            "last_step_at": self.last_step_at,
            "live": [s.job_id for s in self.slots],
            "memory": {
                "base_bytes_per_rank": self.base_bytes,
                "peak_bytes_per_rank": self.peak_bytes,
                "slot_bytes": slot_bytes,
                "lora_bytes_held": lora_held,
            },
        }

    def _boundary(self, final: bool = False) -> dict[str, Any]:
        """The one actor call of a step (rank 0), its answer broadcast to every rank."""
        box: list[Any] = [None]
        if self.rank == 0:
            import ray

            with self._outbox_lock:
                events, self.outbox = self.outbox, []
            box[0] = ray.get(self.host.step_boundary.remote(events, self._status()))
        if final:
            return box[0] or {}
        dist.broadcast_object_list(box, src=0)
        return dict(box[0])

    # ---- serve ---------------------------------------------------------------------------
    def serve(self) -> None:
        self.model.train()
        while True:
            changes = self._boundary()
            if changes["end"]:
                break
            for job_id in changes["stop"]:
                self._stop(job_id)
            for job in changes["join"]:
                self._announce(job)
            if self.pending:
                self._agree_on_joins()
            active = [s for s in self.slots if s.state is SlotState.TRAINING]
            if not active:
                time.sleep(IDLE_POLL_SECONDS if not self.pending else 0.01)
                continue
            train_step(self.ctx, active)
            self.steps += 1
            self.last_step_at = time.time()
            for slot in active:
                if slot.state is SlotState.FAILED:
                    self._leave(slot)
                elif slot.step == slot.total_steps:
                    self._publish(slot)
                elif slot.checkpoint_due(self.spec.checkpoint_every_steps):
                    self._checkpoint(slot)

    # ---- joining: announce → load on every rank → agree → live ---------------------------
    def _announce(self, job: JobSpec) -> None:
        pending = PendingJoin(job)
        self.pending[job.job_id] = pending
        threading.Thread(target=self._load, args=(pending,), daemon=True).start()

    def _load(self, pending: PendingJoin) -> None:
        """Off the training path: the job's data, and its newest checkpoint if it has one."""
        job = pending.job
        try:
            store = open_object_store(self.spec.object_store)
            pending.slot = load_job_slot(job, store, self.tokenizer, self.world_size)
            saved = list_checkpoints(store, job.tenant, job.job_id, up_to_attempt=job.attempt)
            if saved:
                pending.saved = read_checkpoint(store, saved[0])
            elif job.start_from:  # a new job forked from another job's checkpoint
                from safetensors.torch import load

                raw = store.get_bytes(job.start_from + "adapter_model.safetensors")
                pending.start_weights = load(raw)
        except Exception as exc:  # noqa: BLE001 - fails this job only, after agreement
            pending.error = exc
        finally:
            pending.done.set()

    def _agree_on_joins(self) -> None:
        """One all-reduce over every pending join: live when all ranks loaded it, failed when
        any rank could not, else it waits for the next boundary."""
        ids = sorted(self.pending)
        # The last row is rank 0's clock, the same decision on every rank: held long enough.
        held_too_long = (
            self.rank == 0
            and self._holding_since is not None
            and time.monotonic() - self._holding_since > JOIN_TOGETHER_SECONDS
        )
        flags = torch.tensor(
            [
                *(
                    [
                        float(self.pending[i].done.is_set() and self.pending[i].error is None),
                        float(self.pending[i].error is not None),
                    ]
                    for i in ids
                ),
                [float(held_too_long), 0.0],
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(flags)
        *per_job, (expired, _) = flags.tolist()
        idle = not any(slot.state is SlotState.TRAINING for slot in self.slots)
        loading = any(failed == 0 and loaded < self.world_size for loaded, failed in per_job)
        hold = idle and loading and not expired
        if hold and self._holding_since is None:
            self._holding_since = time.monotonic()
        elif not hold:
            self._holding_since = None
        for job_id, (loaded, failed) in zip(ids, per_job, strict=True):
            if failed > 0:
                pending = self.pending.pop(job_id)
                error = pending.error or RuntimeError("another worker could not load the job")
                self._report(
                    job_id,
                    "job_failed",
                    f"Training failed: {type(error).__name__}: {error}",
                    {"error": str(error)},
                )
            elif loaded == self.world_size and not hold:
                self._go_live(self.pending.pop(job_id))

    def _go_live(self, pending: PendingJoin) -> None:
        slot, job = pending.slot, pending.job
        assert slot is not None
        target = job.lora.target_modules
        paths = matching_linear_layers(self.model, target if isinstance(target, str) else [*target])
        unwrapped = [p for p in paths if p not in self.layers]
        if not paths or unwrapped:
            self._report(
                job.job_id,
                "job_failed",
                f"Training failed: target_modules {target!r} match no adaptable linear layer",
                {"error": f"target_modules {target!r} match no adaptable linear layer"},
            )
            return
        init = slot.generator(INIT_STREAM)
        for path in paths:
            self.layers[path].add_slot(slot.config, init, self.device)
        slot.setup_optimizer(slot_parameters(self.model, job.job_id))
        if job.lora.dropout > 0:
            self.routing.generators[job.job_id] = slot.generator(DROPOUT_STREAM, self.device)
        resumed = self._restore(slot, pending)
        self.slots.append(slot)
        self.paths[job.job_id] = paths
        self.peak_bytes = 0  # peak memory is measured per membership
        self._report(
            job.job_id,
            "message",
            f"Training started: {slot.total_steps} steps on {self.world_size} workers "
            f"({self.spec.shape.precision}), {len(slot.examples)} examples, joined a pack "
            f"of {len(self.slots)} at host step {self.steps}",
            {
                "total_steps": slot.total_steps,
                "workers": self.world_size,
                "precision": self.spec.shape.precision,
                "pack_size": len(self.slots),
                "host_step": self.steps,
                "resumed_from_step": resumed,
            },
        )

    def _restore(self, slot: JobSlot, pending: PendingJoin) -> int | None:
        """Puts back the job's newest checkpoint (or its start_from weights); its step."""
        if pending.saved is not None:
            tensors, state = pending.saved
            load_slot_state(self.model, slot.job_id, tensors)
            slot.restore(state)
            generator = self.routing.generators.get(slot.job_id)
            if generator is not None:  # the same format as a one-shot run's checkpoints
                reseed = reseed_for(slot.spec.training.seed, slot.step, self.rank)
                restore_dropout_rng(
                    generator, state.get("dropout_rng"), self.rank, self.world_size, reseed
                )
            return slot.step
        if pending.start_weights is not None:
            load_slot_state(self.model, slot.job_id, pending.start_weights)
            self._report(
                slot.job_id,
                "message",
                f"Started from checkpoint {slot.spec.start_from_name}",
                {"start_from": slot.spec.start_from_name},
            )
        return None

    # ---- leaving -------------------------------------------------------------------------
    def _leave(self, slot: JobSlot) -> None:
        """Frees the slot's factors, optimizer state and data on this rank."""
        for layer in self.layers.values():
            layer.remove_slot(slot.job_id)
        self.routing.generators.pop(slot.job_id, None)
        slot.optimizer, slot.schedule, slot.params = None, None, []
        slot.examples, slot.batches = [], []
        self.slots.remove(slot)
        self.paths.pop(slot.job_id, None)
        self.peak_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _publish(self, slot: JobSlot) -> None:
        slot.state = SlotState.DONE
        # What each rank holds of the frozen base (ZeRO-3), shown with the published adapter
        # as a run shows it; every rank takes part (a collective), once per job.
        held = partitioning(self.ctx)
        if self.writer is not None:
            factors = slot_state_dict(self.model, slot.job_id)  # copies, taken now
            extra = {"steps": slot.step, "pack_size": len(self.slots), "partitioning": held}
            self.writer.publish(slot.spec, self.paths[slot.job_id], factors, extra)
        self._leave(slot)

    def _checkpoint(self, slot: JobSlot) -> None:
        generator = self.routing.generators.get(slot.job_id)
        rng: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng, generator.get_state() if generator is not None else None)
        if self.writer is not None:
            device_type = generator.device.type if generator is not None else self.device.type
            self.writer.checkpoint(
                slot.spec,
                self.paths[slot.job_id],
                slot_state_dict(self.model, slot.job_id),
                slot.training_state(dropout_rng=saved_dropout_rng(rng, device_type)),
                {"step": slot.step, "train_loss": slot.last_loss},
            )

    def _stop(self, job_id: str) -> None:
        if self.pending.pop(job_id, None) is not None:
            self._report(job_id, "job_cancelled", "Training stopped: job cancelled")
            return
        for slot in self.slots:
            if slot.job_id == job_id:
                slot.state = SlotState.CANCELLED
                self._leave(slot)
                self._report(job_id, "job_cancelled", "Training stopped: job cancelled")
                return

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._boundary(final=True)  # the last events (publishes) reach the actor
        dist.barrier()
        del self.engine, self.model, self._hf_deepspeed_config


def host_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker of a pack host."""
    worker = HostWorker(config["spec"], config["host"])
    if worker.setup():
        worker.serve()
    worker.cleanup()
