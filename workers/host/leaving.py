"""A slot leaving a pack host's workers, on each rank: published when its training is done,
checkpointed and handed back (a pause, a drain), stopped (a cancel), or failed; in each case
its factors, optimizer and data are freed. Rank 0's background writer writes what it leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from workers.host.objective import reference_slot_name
from workers.host.slot import JobSlot, SlotState
from workers.host.step import PackContext
from workers.lora.packed_layer import PackedLoraLinear, Routing, slot_state_dict
from workers.runtime.memory_report import rank_memory_report
from workers.training.rng_state import saved_dropout_rng

if TYPE_CHECKING:
    from workers.host.join import PendingJoin
    from workers.host.writer import SlotWriter


class HostLeaving:
    """The leaving half of `workers.host.worker_loop.HostWorker` (which sets these attributes;
    the evaluation state a checkpoint carries is `workers.host.evaluating.HostEvaluations`')."""

    world_size: int
    device: torch.device
    model: torch.nn.Module
    routing: Routing
    layers: dict[str, PackedLoraLinear]
    slots: list[JobSlot]
    paths: dict[str, list[str]]
    pending: dict[str, PendingJoin]
    ctx: PackContext
    writer: SlotWriter | None

    if TYPE_CHECKING:  # the worker's and HostEvaluations' (a body here would shadow theirs)

        def _report(
            self, job_id: str | None, kind: str, message: str, data: dict[str, Any] | None = None
        ) -> None: ...

        def _published_factors(self, slot: JobSlot) -> dict[str, torch.Tensor]: ...
        def _validation_state(self, slot: JobSlot) -> dict[str, Any]: ...
        def _checkpoint_metrics(self, slot: JobSlot) -> dict[str, Any]: ...

    def _leave(self, slot: JobSlot) -> None:
        """Frees the slot's factors, optimizer state and data on this rank."""
        for layer in self.layers.values():
            layer.remove_slot(slot.job_id)
            layer.remove_slot(reference_slot_name(slot.job_id))  # a DPO job's, if it has one
        self.routing.generators.pop(slot.job_id, None)
        slot.optimizer, slot.schedule, slot.params = None, None, []
        slot.examples, slot.batches = [], []
        self.slots.remove(slot)
        self.paths.pop(slot.job_id, None)

    def _publish(self, slot: JobSlot) -> None:
        slot.state = SlotState.DONE
        # What each rank holds of the frozen base (ZeRO-3), shown with the published adapter;
        # every rank takes part (a collective), once per job.
        held = partitioning(self.ctx)
        if self.writer is not None:
            factors = self._published_factors(slot)  # copies, taken now
            extra = {"steps": slot.step, "pack_size": len(self.slots), "partitioning": held}
            self.writer.publish(slot.spec, self.paths[slot.job_id], factors, extra)
        self._leave(slot)

    def _hand_back(self, job_id: str) -> None:
        """A pause or a drain: the slot is checkpointed at this boundary (every rank takes
        part) and leaves; its `handed_back` event follows the written checkpoint. Asked
        again at each boundary until that event reaches the host: then nothing is left here."""
        if self.pending.pop(job_id, None) is not None:  # never live: its newest checkpoint stands
            self._report(job_id, "handed_back", "Left before it went live", {"step": None})
            return
        for slot in self.slots:
            if slot.job_id == job_id and slot.state is SlotState.TRAINING:
                if slot.step > 0:
                    self._checkpoint(slot, hand_back=True)
                else:  # nothing trained: it starts afresh
                    data = {"step": None}
                    self._report(job_id, "handed_back", "Left before its first step", data)
                self._leave(slot)
                return

    def _checkpoint(self, slot: JobSlot, hand_back: bool = False) -> None:
        generator = self.routing.generators.get(slot.job_id)
        rng: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng, generator.get_state() if generator is not None else None)
        if self.writer is not None:
            device_type = generator.device.type if generator is not None else self.device.type
            self.writer.checkpoint(
                slot.spec,
                self.paths[slot.job_id],
                slot_state_dict(self.model, slot.job_id),
                slot.training_state(
                    dropout_rng=saved_dropout_rng(rng, device_type), **self._validation_state(slot)
                ),
                self._checkpoint_metrics(slot),
                hand_back=hand_back,
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


def partitioning(ctx: PackContext) -> list[dict[str, Any]]:
    """What every rank holds of the frozen base, and its memory (a collective)."""
    mine = rank_memory_report(ctx.model, ctx.rank)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    return gathered
