"""A pack host as seen from one Ray Train worker: load the base once, then train whichever
jobs the host actor hands over, step after step, until the host ends.

Lifecycle: setup (the base loaded already partitioned by ZeRO-3; every linear layer wrapped
once, so a join never re-wraps the model) → serve (at each step boundary: one call from
rank 0 to the host actor, carrying the step's events and bringing the membership changes,
broadcast to every rank; joins are two-phase: every rank loads the job's data in a thread,
the ranks agree with one all-reduce, the slot goes live at the same step everywhere; then
one step over the live slots) → cleanup. A slot that leaves frees its factors, optimizer
and data; its adapter is published by rank 0's background writer. Joining is
`workers.host.join`, evaluating `workers.host.evaluating`, leaving `workers.host.leaving`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from core.host_protocol import HostSpec, host_actor_name
from workers.host.evaluating import HostEvaluations
from workers.host.join import HostJoins, PendingJoin
from workers.host.leaving import HostLeaving
from workers.host.memory import MembershipMemory
from workers.host.request_slots import RequestSlots
from workers.host.slot import JobSlot, SlotState
from workers.host.step import (
    WIDTH_BUCKET,
    PackContext,
    train_step,
    use_gradient_checkpointing,
)
from workers.host.step_riders import take_riders
from workers.host.writer import SlotWriter
from workers.lora.packed_layer import (
    Routing,
    adaptable_layers,
    packed_layers,
    wrap_linear_layers,
)
from workers.runtime.base_models import resolve_base_model
from workers.runtime.deepspeed_config import build_deepspeed_config
from workers.runtime.deepspeed_ops import use_prebuilt_ops
from workers.runtime.memory_report import rank_memory_report
from workers.runtime.placement_groups import record_placement_group
from workers.runtime.setup_guard import SetupPhases

# An idle rank 0's boundary call waits in the host actor up to this long for work (a Tinker
# request or a membership change ends the wait at once): what it costs is only how late
# events written between boundaries (a publish's) and the idle timeout are seen.
IDLE_WAIT_SECONDS = 0.2


class HostWorker(HostJoins, HostEvaluations, HostLeaving):
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
        self.writer: SlotWriter | None = None  # rank 0's, once set up
        self.steps = 0
        self.last_step_at: float | None = None

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> bool:
        """Loads the base, each phase (core.host_protocol.SETUP_PHASES) under the setup time
        limit, so that setup can fail but never hang; False when the host actor says the
        host should end instead (then nothing is loaded)."""
        import ray

        if ray.get(self.host.setup_gave_up.remote(), timeout=30):
            return False  # restarted after a setup timeout: the host is ending
        phases = SetupPhases(self.spec.setup_timeout_seconds, self._setup_timed_out)
        with phases.phase("distributed"):
            self._setup_distributed()
        self.writer = (
            SlotWriter(
                self.spec.object_store,
                self.spec.checkpoint_keep_last,
                self._report,
                self.spec.publish_retry_seconds,
            )
            if self.rank == 0
            else None
        )
        # Each rank's process and node, for the host's reports (which node a rank was on).
        ranks: list[Any] = [None] * self.world_size
        here = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        dist.all_gather_object(ranks, (os.getpid(), *here))
        pids = [pid for pid, _, _ in ranks]
        nodes = [{"node_id": node_id, "ip": ip} for _, node_id, ip in ranks]
        box: list[Any] = [None]
        if self.rank == 0:
            # So that the scheduler can free it should Ray not (runtime/placement_groups.py).
            record_placement_group(host_actor_name(self.spec.host_id))
            box[0] = ray.get(self.host.begin_attempt.remote(pids, nodes))
        dist.broadcast_object_list(box, src=0)
        if box[0]["end"]:
            return False
        with phases.phase("base_model"):
            self._load_base()
        with phases.phase("deepspeed"):
            self._setup_deepspeed()
        return True

    def _setup_timed_out(self, phase: str, error: str) -> None:
        import ray

        # Any rank may be the stuck one: each tells the host actor (the first word counts).
        ray.get(self.host.fail_setup.remote(phase, error), timeout=30)

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
        # Never compile or wait on a build lock here (workers/runtime/deepspeed_ops.py).
        use_prebuilt_ops()
        # Ray Train already created the process group; DeepSpeed adopts it as it is.
        deepspeed.init_distributed(dist_backend="nccl" if shape.use_gpu else "gloo")
        self.dtype = torch.bfloat16 if shape.precision == "bf16" else torch.float32

    def _load_base(self) -> None:
        """The base (fetched first when it is on s3://), loaded already partitioned."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        self.base_path = resolve_base_model(
            self.spec.shape.base_model_uri, self.spec.model_cache_dir, self.spec.object_store
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.ds_config = build_deepspeed_config(
            micro_batch_per_rank=1,  # DeepSpeed only partitions the base: no batch of its own
            precision=self.spec.shape.precision,
            param_persistence_threshold=self.spec.zero3_param_persistence_threshold,
        )
        # Kept alive on purpose: while it exists, from_pretrained loads under zero.Init.
        self._hf_deepspeed_config = HfDeepSpeedConfig(self.ds_config)
        self.base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        self.base.requires_grad_(False)

    def _setup_deepspeed(self) -> None:
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=self.base, config=self.ds_config)
        del self.base  # the engine holds it
        self.model = self.engine.module
        if self.spec.gradient_checkpointing:
            use_gradient_checkpointing(self.model, self.routing)
        # Every layer a slot may adapt (all-linear, and lm_head for Tinker's train_unembed),
        # wrapped once: a slot only gets factors where asked.
        self.layers = wrap_linear_layers(self.model, adaptable_layers(self.model), self.routing)
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
            faults=self.spec.test_faults,  # TEST HOOK: empty outside tests
        )
        self.memory = MembershipMemory(self.spec, self.base_path, self.ctx)
        # Tinker models: slots driven by their clients' requests (issue 21).
        self.requests = RequestSlots(
            self.model,
            self.layers,
            self.routing,
            self.device,
            self.tokenizer.pad_token_id,
            self.rank,
            store=self._join_store,
            world_size=self.world_size,
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
        measured = self.memory.latest
        return {
            "stepped": self.last_step_at is not None,
            "step": self.steps,
            "last_step_at": self.last_step_at,
            "live": [s.job_id for s in self.slots],
            "pending": sorted(self.pending),  # announced, still loading
            # Tinker requests answered since the last boundary, and the models live here.
            "request_answers": self.requests.take_answers(),
            "request_models": self.requests.live(),
            # Done training, adapter being written (rank 0's writer; the store may be away).
            "publishing": self.writer.publishing() if self.writer is not None else [],
            "memory": {
                "base_bytes_per_rank": self.base_bytes,
                # The second step of the latest membership (workers.host.memory).
                "peak_bytes_per_rank": measured.get("measured_peak_bytes", 0),
                "estimate_bytes_per_rank": measured.get("estimate_bytes", 0),
                "members": measured.get("members", []),
                "slot_bytes": slot_bytes,
                "lora_bytes_held": lora_held,
            },
        }

    def _boundary(self, final: bool = False, idle_wait: float = 0.0) -> dict[str, Any]:
        """The one actor call of a step (rank 0), its answer broadcast to every rank."""
        box: list[Any] = [None]
        if self.rank == 0:
            import ray

            with self._outbox_lock:
                events, self.outbox = self.outbox, []
            box[0] = ray.get(self.host.step_boundary.remote(events, self._status(), idle_wait))
        if final:
            return box[0] or {}
        dist.broadcast_object_list(box, src=0)
        return dict(box[0])

    # ---- serve ---------------------------------------------------------------------------
    def serve(self) -> None:
        self.model.train()
        idle_wait = 0.0
        while True:
            changes = self._boundary(idle_wait=idle_wait)
            idle_wait = 0.0
            if changes["end"]:
                break
            for job_id in changes["stop"]:
                self._stop(job_id)
            for job_id in changes.get("hand_back", ()):
                self._hand_back(job_id)
            if changes["join"]:
                self._announce(changes["join"])
            if self.pending:
                self._agree_on_joins()
            queued = list(changes.get("requests") or ())
            active = [s for s in self.slots if s.state is SlotState.TRAINING]
            training = [s for s in active if not s.evaluating and s.step < s.total_steps]
            # Tinker clients' work (workers.host.request_slots): with jobs training, each
            # model's next forward work rides in their step (workers.host.step_riders) and
            # the rest runs after it; otherwise all of it runs now.
            riders, queued = (
                take_riders(queued, self.requests, WIDTH_BUCKET) if training else (None, queued)
            )
            if queued and riders is None:
                self.requests.run(queued)
                queued = []
            if not active:
                # Answers go out at once; joins loading are looked at again soon; otherwise
                # the next boundary waits for work in the host actor.
                if self.pending:
                    time.sleep(0.01)
                elif not changes.get("requests"):
                    idle_wait = IDLE_WAIT_SECONDS
                continue
            # A job being evaluated sits its training out (its adapter is the one evaluated);
            # its chunk of validation rows goes through the base beside its mates' step.
            evaluating = [s for s in active if s.evaluating]
            if training and evaluating:
                # Memory is measured on steps of the whole pack only: not a membership of
                # its own each time a job sits out for an evaluation.
                train_step(self.ctx, training, riders)
            elif training:
                measured = self.memory.step(training, riders)
                if measured is not None:
                    self._report_memory(measured)
            if queued:  # each model's requests after the one that rode the step
                self.requests.run(queued)
            self._evaluate(evaluating)
            self.steps += 1
            self.last_step_at = time.time()
            for slot in active:
                if slot.state is SlotState.FAILED:
                    self._leave(slot)
                elif self._evaluation_starts(slot):
                    continue  # checkpointed or published once evaluated
                elif slot.evaluating:
                    continue
                elif slot.step == slot.total_steps or self._stopped_early(slot):
                    self._publish(slot)
                elif slot.checkpoint_due(
                    self.spec.checkpoint_every_steps
                ) or self._best_checkpoint_due(slot):
                    self._checkpoint(slot)

    def _report_memory(self, measured: dict[str, Any]) -> None:
        """Each member is told the pack's measured peak per rank and admission's estimate."""
        mib = 2**20
        peak, estimate = measured["measured_peak_bytes"], measured["estimate_bytes"]
        message = (
            f"Memory per worker with {len(measured['members'])} job(s) at host step "
            f"{self.steps + 1}: measured peak {peak / mib:.1f} MiB, "
            f"estimated {estimate / mib:.1f} MiB"
        )
        for job_id in measured["members"]:
            self._report(job_id, "memory", message, {**measured, "host_step": self.steps + 1})

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if hasattr(self, "model"):
                self._boundary(final=True)  # the last events (publishes) reach the actor
        dist.barrier()
        for name in ("engine", "model", "_hf_deepspeed_config"):  # absent if setup ended early
            self.__dict__.pop(name, None)


def host_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker of a pack host."""
    worker = HostWorker(config["spec"], config["host"])
    if worker.setup():
        worker.serve()
    worker.cleanup()
