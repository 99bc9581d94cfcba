"""Joining a pack host, on each of its workers, in two phases: the host actor announces a
job; every rank loads and tokenizes its data (and its newest checkpoint) in a thread, off
the training path; the ranks agree with one all-reduce that all of them succeeded; the slot
goes live at the same step everywhere. A rank that fails to load fails that job only.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from core.checkpoint_index import list_checkpoints
from core.host_protocol import HostSpec
from core.objectstore import ObjectStore, open_object_store
from core.spec import JobSpec
from workers.host.failures import TRACEBACK_CHARS
from workers.host.objective import add_reference_slot, reference_slot_name
from workers.host.slot import DROPOUT_STREAM, INIT_STREAM, JobSlot, SlotState, load_job_slot
from workers.host.step import Report
from workers.lora.packed_layer import (
    PackedLoraLinear,
    Routing,
    load_slot_state,
    matching_linear_layers,
    slot_parameters,
)
from workers.training.checkpoints import read_checkpoint
from workers.training.rng_state import reseed_for, restore_dropout_rng

# An idle host holds back jobs that loaded while others announced with them still load (at
# most this long): jobs that arrive together start in one pack, and nobody waits on them.
JOIN_TOGETHER_SECONDS = 5.0
# A busy host's step waits at most this long, once, for a job announced at its boundary to
# load (tiny data and a checkpoint load in milliseconds): the job goes live at this step,
# not a whole step later. A slower load finishes in the background as before.
JOIN_WAIT_SECONDS = 0.1
# Never seen unless a rank's error vanished between the all-reduce and the gather.
UNKNOWN_CAUSE = "a worker could not load the job"


@dataclass
class PendingJoin:
    """A job announced to the workers and loading on this rank, not yet live."""

    job: JobSpec
    announced_step: int = 0
    load_seconds: float | None = None  # on this rank: data, tokenizing, checkpoint
    slot: JobSlot | None = None
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    start_weights: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class HostJoins:
    """The joining half of `workers.host.worker_loop.HostWorker` (which sets these attributes)."""

    spec: HostSpec
    rank: int
    world_size: int
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module
    routing: Routing
    layers: dict[str, PackedLoraLinear]
    slots: list[JobSlot]
    paths: dict[str, list[str]]
    pending: dict[str, PendingJoin]
    steps: int
    _holding_since: float | None  # idle, holding loaded joins back (rank 0)
    _store: ObjectStore | None = None  # made at the first join
    _report: Report

    def _announce(self, jobs: list[JobSpec]) -> None:
        """Starts loading each job, and gives the new loads up to JOIN_WAIT_SECONDS
        (together) to finish, so that they can go live at this step."""
        announced = [PendingJoin(job, announced_step=self.steps) for job in jobs]
        for pending in announced:
            self.pending[pending.job.job_id] = pending
            threading.Thread(target=self._load, args=(pending,), daemon=True).start()
        deadline = time.monotonic() + JOIN_WAIT_SECONDS
        for pending in announced:
            pending.done.wait(max(0.0, deadline - time.monotonic()))

    def _load(self, pending: PendingJoin) -> None:
        """Off the training path: the job's data, and its newest checkpoint if it has one."""
        job, started = pending.job, time.monotonic()
        try:
            store = self._join_store()
            pending.slot = load_job_slot(job, store, self.tokenizer, self.world_size)
            saved = list_checkpoints(store, job.tenant, job.job_id, up_to_attempt=job.attempt)
            if saved:
                pending.saved = read_checkpoint(store, saved[0])
            # A new job forked from another job's checkpoint; a DPO job also keeps it as its
            # reference, resumed or not.
            if job.start_from and (not saved or job.training.preference is not None):
                from safetensors.torch import load

                raw = store.get_bytes(job.start_from + "adapter_model.safetensors")
                pending.start_weights = load(raw)
        except Exception as exc:  # noqa: BLE001 - fails this job only, after agreement
            pending.error = exc
        finally:
            pending.load_seconds = time.monotonic() - started
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
        failed_ids = [job_id for job_id, (_, failed) in zip(ids, per_job, strict=True) if failed]
        causes = self._load_errors(failed_ids) if failed_ids else {}
        for job_id, (loaded, failed) in zip(ids, per_job, strict=True):
            if failed > 0:
                self.pending.pop(job_id)
                unknown = (None, "RuntimeError", UNKNOWN_CAUSE, "")
                rank, kind, error, trace = causes.get(job_id, unknown)
                self._report(
                    job_id,
                    "job_failed",
                    f"Training failed: {kind}: {error}",
                    {"error": error, "rank": rank, "traceback": trace},
                )
            elif loaded == self.world_size and not hold:
                self._go_live(self.pending.pop(job_id))

    def _join_store(self) -> ObjectStore:
        """One object-store client for every join on this rank (an S3 client takes ~0.1 s to
        make, more than a join's whole load; clients are thread-safe)."""
        if self._store is None:
            self._store = open_object_store(self.spec.object_store)
        return self._store

    def _load_errors(self, job_ids: list[str]) -> dict[str, tuple[int, str, str, str]]:
        """Each failed job's own load error, (rank, type, text, traceback), from the first
        rank that has one. A collective (every rank saw the same failures in the all-reduce):
        the rank that reports, rank 0, may not be the one that failed, or still loading it."""
        mine = {
            job_id: (self.rank, type(error).__name__, str(error), _traceback_of(error))
            for job_id in job_ids
            if (error := self.pending[job_id].error) is not None
        }
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        causes: dict[str, tuple[int, str, str, str]] = {}
        for per_rank in gathered:  # rank order: the same choice on every rank
            for job_id, cause in per_rank.items():
                causes.setdefault(job_id, cause)
        return causes

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
        if slot.objective.reference_route == reference_slot_name(job.job_id):
            assert pending.start_weights is not None  # loaded with a start_from
            add_reference_slot([self.layers[p] for p in paths], slot.config, self.device)
            load_slot_state(self.model, reference_slot_name(job.job_id), pending.start_weights)
        if job.lora.dropout > 0:
            self.routing.generators[job.job_id] = slot.generator(DROPOUT_STREAM, self.device)
        resumed = self._restore(slot, pending)
        self.slots.append(slot)
        self.paths[job.job_id] = paths
        self._report(
            job.job_id,
            "message",
            f"Training started: {slot.total_steps} steps on {self.world_size} workers "
            f"({self.spec.shape.precision}), {len(slot.examples)} examples, joined a pack "
            f"of {len(self.slots)} at host step {self.steps}"
            # A restart (a node lost, a crash) says where the job picks up again.
            + ("" if resumed is None else f"; resumed from step {resumed}"),
            {
                "total_steps": slot.total_steps,
                "workers": self.world_size,
                "precision": self.spec.shape.precision,
                "pack_size": len(self.slots),
                "host_step": self.steps,
                # Where a join's time went: the steps it waited, its load on rank 0.
                "announced_at_host_step": pending.announced_step,
                "load_seconds": pending.load_seconds,
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
            if generator is not None:
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


def _traceback_of(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text[-TRACEBACK_CHARS:]
