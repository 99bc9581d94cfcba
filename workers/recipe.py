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

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from core.objectstore import open_object_store
from core.run_states import run_actor_name
from core.spec import RunSpec
from workers.host.slot import JobSlot, SlotState, load_job_slot
from workers.host.step import (
    PackContext,
    fail_slot,
    report_job_failure,
    train_step,
    use_gradient_checkpointing,
)
from workers.lora.packed_layer import (
    Routing,
    matching_linear_layers,
    slot_parameters,
    wrap_linear_layers,
)
from workers.run_events import EventNumbering
from workers.runtime.base_models import resolve_base_model
from workers.runtime.deepspeed_config import build_deepspeed_config
from workers.runtime.deepspeed_ops import use_prebuilt_ops
from workers.runtime.placement_groups import record_placement_group
from workers.runtime.setup_guard import SetupPhases
from workers.slot_io import checkpoint_slot, publish_slot, resume_slot

DROPOUT_STREAM, INIT_STREAM = 1, 2


class PackTrainingRecipe:
    def __init__(self, spec: RunSpec, reporter: Any) -> None:
        self.spec = spec
        self.reporter = reporter  # the run's actor; only rank 0 talks to it
        self.slots: list[JobSlot] = []
        self.routing = Routing()
        self._stops: set[str] = set()  # rank 0: the jobs to stop, as last heard
        self._stop_asked: Any = None  # rank 0: the stop request in flight
        self.outbox: list[dict[str, Any]] = []  # rank 0: events not yet sent to the actor

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """Each phase under the setup time limit: past it the run fails, naming the phase."""
        phases = SetupPhases(self.spec.setup_timeout_seconds, self._setup_timed_out)
        with phases.phase("distributed"):
            self._setup_distributed()
        with phases.phase("jobs"):
            self._setup_jobs()
        if not self.slots:  # every job ended already (e.g. a restart after they all failed)
            return
        with phases.phase("base_model"):
            self._setup_base()
        with phases.phase("slots"):
            self._setup_slots()
        self.send_events()

    def _setup_timed_out(self, phase: str, error: str) -> None:
        import ray

        # Any rank may be the stuck one: each tells the actor (it keeps the first word).
        ray.get(self.reporter.fail_setup.remote(phase, error), timeout=30)

    def _setup_distributed(self) -> None:
        import deepspeed
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        # Ray Train's own device assignment: `cuda:<local_rank>` is wrong when the GPUs a
        # node lends are not numbered from 0 in rank order (two ranks would share one).
        self.device = ray.train.torch.get_device() if self.spec.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Never compile or wait on a build lock here (workers/runtime/deepspeed_ops.py).
        self.shm_comm = use_prebuilt_ops()
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
        self.numbering = EventNumbering(self.restart)
        self._register_workers()
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
        if self.spec.gradient_checkpointing:
            use_gradient_checkpointing(self.model, self.routing)

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
            resume_slot(self.ctx, slot, self.spec.object_store)
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
                    "precision": self.spec.precision,
                    "device": self.device.type,
                },
            )
        self.paths = wanted

    def _register_workers(self) -> None:
        """Every rank's pid and node, kept by the run's actor (`RunActor.workers`)."""
        import ray

        mine = {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        processes: list[Any] = [None] * self.world_size
        dist.all_gather_object(processes, mine)
        if self.rank == 0:
            ray.get(self.reporter.register_workers.remote(processes))
            # So that the scheduler can free it should Ray not (runtime/placement_groups.py).
            record_placement_group(run_actor_name(self.spec.run_id))

    # ---- reporting ---------------------------------------------------------------------
    def _report(
        self, job_id: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        """Keeps the event for the step's one call to the actor (`send_events`)."""
        if self.rank == 0:
            # Numbered: the actor applies events in this order whatever order Ray runs them.
            self.outbox.append(
                self.numbering.stamp(
                    {
                        "job_id": job_id,
                        "type": kind,
                        "message": message,
                        # When it happened, to the sub-second, as a pack host's events say.
                        "data": {"time": time.time(), **(data or {})},
                    }
                )
            )

    def send_events(self) -> None:
        """Rank 0: every event since the last call, in one actor call (once per step), not
        waited for; numbered, so batches applied out of order still apply in order."""
        if getattr(self, "rank", None) == 0 and self.outbox:
            events, self.outbox = self.outbox, []
            self.reporter.record.remote(events)

    def _report_job_failure(self, job_id: str, exc: BaseException) -> None:
        report_job_failure(self.ctx, job_id, exc)

    def _fail_slot(self, slot: JobSlot, exc: BaseException) -> None:
        fail_slot(self.ctx, slot, exc)

    @property
    def ctx(self) -> PackContext:
        """The explicit view of this run that the shared step/slot functions take."""
        return PackContext(
            model=getattr(self, "model", None),  # type: ignore[arg-type]
            routing=self.routing,
            pad_token_id=self.tokenizer.pad_token_id if hasattr(self, "tokenizer") else 0,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            report=self._report,
            loss_chunk_tokens=self.spec.loss_chunk_tokens,
        )

    # ---- train -------------------------------------------------------------------------
    def _stop_requests(self) -> set[str]:
        """Which jobs to stop, the same on every rank. Rank 0 never waits for the run's actor
        on the step's path: it takes the answer to the request sent at an earlier boundary
        if it has arrived (else the stops it knew), and sends the next request."""
        import ray

        if self.rank == 0:
            ready, _ = ray.wait([self._stop_asked], timeout=0)
            if ready:
                self._stops = set(ray.get(ready[0]))
                self._stop_asked = self.reporter.stop_requests.remote()
        box: list[Any] = [sorted(self._stops) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return set(box[0])

    def active(self) -> list[JobSlot]:
        return [s for s in self.slots if s.state is SlotState.TRAINING]

    def train(self) -> None:
        if not self.slots:
            return
        self.model.train()
        ctx = self.ctx
        if self.rank == 0:
            self._stop_asked = self.reporter.stop_requests.remote()
        while True:
            self.send_events()  # the last step's events: one call per step, all jobs
            stop = self._stop_requests()
            for slot in self.active():
                if slot.job_id in stop or "*" in stop:
                    slot.state = SlotState.CANCELLED
                    self._report(slot.job_id, "job_cancelled", "Training stopped: job cancelled")
            active = self.active()
            if not active:
                self.send_events()
                break
            train_step(ctx, active)
            for slot in active:
                if slot.state is not SlotState.TRAINING:
                    continue
                if slot.step == slot.total_steps:
                    publish_slot(ctx, slot, self.paths[slot.job_id], self.spec.object_store)
                elif slot.checkpoint_due(self.spec.checkpoint_every_steps):
                    checkpoint_slot(
                        ctx,
                        slot,
                        self.paths[slot.job_id],
                        self.spec.object_store,
                        self.spec.checkpoint_keep_last,
                    )

    def cleanup(self) -> None:
        for name in ("engine", "model", "_hf_deepspeed_config"):
            self.__dict__.pop(name, None)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    recipe = PackTrainingRecipe(config["spec"], config["reporter"])
    try:
        recipe.setup()
        recipe.train()
    finally:  # events of a setup that ended every job, or of a step that raised
        recipe.send_events()
    recipe.cleanup()
