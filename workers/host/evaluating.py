"""A pack host's part in validation: after a job's step, start its evaluation when one is due;
each step, a chunk of every evaluation under way; when one ends, its metrics event, early
stopping's bookkeeping and, for a stopped job, the best adapter to publish.

The metrics (workers/host/evaluation.py) go out with OpenAI's names in a `metrics` event and
into every later checkpoint's `metrics`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from core.checkpoint_index import list_checkpoints
from workers.host.evaluation import Evaluation, evaluate_step
from workers.host.slot import JobSlot
from workers.lora.packed_layer import slot_state_dict
from workers.training.checkpoints import read_checkpoint

if TYPE_CHECKING:
    from workers.host.step import PackContext
    from workers.host.writer import SlotWriter


class HostEvaluations:
    """Mixed into the host's worker (workers.host.worker_loop.HostWorker)."""

    ctx: PackContext
    writer: SlotWriter | None

    def _report(
        self, job_id: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None: ...

    def _evaluation_starts(self, slot: JobSlot) -> bool:
        """True when an evaluation of the slot's adapter starts now: one is due at its step
        and was not made yet (also for a job handed back mid-evaluation and resumed). The
        job trains on, and is checkpointed or published, once it is done."""
        validation = slot.validation
        if validation is None or slot.evaluating or validation.done_step == slot.step:
            return False
        if not validation.due(slot.step, slot.total_steps):
            return False
        validation.start(slot.step, slot.total_steps)
        return slot.evaluating

    def _evaluate(self, slots: list[JobSlot]) -> None:
        """One chunk of each evaluation under way; the finished ones are reported."""
        if not slots:
            return
        for slot, evaluation in evaluate_step(self.ctx, slots):
            self._evaluated(slot, evaluation)

    def _evaluated(self, slot: JobSlot, evaluation: Evaluation) -> None:
        validation = slot.validation
        assert validation is not None
        best = validation.finish(evaluation)
        if best and self.writer is not None:  # rank 0 publishes: the copy is kept there
            validation.best_factors = slot_state_dict(self.ctx.model, slot.job_id)
        figures = {k: v for k, v in validation.latest.items() if math.isfinite(v)}
        metrics = {**self._step_metrics(slot, evaluation.step), **figures}
        if best:
            validation.best_metrics = metrics
        loss_name = "valid_loss" if evaluation.kind == "sample" else "full_valid_loss"
        what = "validation loss" if evaluation.kind == "sample" else "full validation loss"
        self._report(
            slot.job_id,
            "metrics",
            f"Step {evaluation.step}/{slot.total_steps}: {what}={validation.latest[loss_name]:.4f}",
            # No step_seconds nor total_steps: not a training step (step counters and the
            # finish estimate count those), but the same step's figures with validation's.
            {**metrics, "evaluation": evaluation.kind},
        )
        if validation.stopped_early:
            self._report(
                slot.job_id,
                "message",
                f"Early stopping at step {evaluation.step}: the validation loss has not improved "
                f"for {validation.since_best} evaluations; the checkpoint of step "
                f"{validation.best_step} (validation loss {validation.best_loss:.4f}) is "
                "published as the adapter",
                {
                    "early_stopped": True,
                    "step": evaluation.step,
                    "best_step": validation.best_step,
                    "best_valid_loss": validation.best_loss,
                },
            )
            if validation.best_metrics:
                # The job's last metrics are those of the adapter it publishes: the final
                # checkpoint that checkpoints.list shows is the best step's.
                self._report(
                    slot.job_id,
                    "metrics",
                    f"Published adapter: step {validation.best_step} (best validation loss)",
                    {**validation.best_metrics, "evaluation": "best"},
                )

    @staticmethod
    def _step_metrics(slot: JobSlot, step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"step": step, "train_loss": slot.last_loss}
        if slot.last_accuracy is not None:
            metrics["train_mean_token_accuracy"] = slot.last_accuracy
        return metrics

    def _checkpoint_metrics(self, slot: JobSlot) -> dict[str, Any]:
        """A checkpoint's metrics: its step's training figures and the newest validation ones."""
        latest = slot.validation.latest if slot.validation is not None else {}
        finite = {k: v for k, v in latest.items() if math.isfinite(v)}
        return {**self._step_metrics(slot, slot.step), **finite}

    def _validation_state(self, slot: JobSlot) -> dict[str, Any]:
        return {"validation": slot.validation.state() if slot.validation is not None else None}

    def _best_checkpoint_due(self, slot: JobSlot) -> bool:
        """Early stopping keeps each new best as a checkpoint (never pruned)."""
        validation = slot.validation
        return (
            validation is not None
            and validation.patience is not None
            and validation.best_step == slot.step
        )

    def _stopped_early(self, slot: JobSlot) -> bool:
        return slot.validation is not None and slot.validation.stopped_early

    def _published_factors(self, slot: JobSlot) -> dict[str, torch.Tensor]:
        """What rank 0 publishes: the adapter as trained, or early stopping's best (kept in
        memory since its evaluation, else read back from its checkpoint after a restart)."""
        validation = slot.validation
        if validation is None or not validation.stopped_early:
            return slot_state_dict(self.ctx.model, slot.job_id)
        if validation.best_factors is not None:
            return validation.best_factors
        assert self.writer is not None
        spec = slot.spec
        saved = list_checkpoints(self.writer.store, spec.tenant, spec.job_id, spec.attempt)
        info = next((c for c in saved if c.step == validation.best_step), None)
        if info is not None:
            return read_checkpoint(self.writer.store, info)[0]
        # Its write failed (the store was away then): the adapter as trained, said so.
        self._report(
            slot.job_id,
            "message",
            f"The best checkpoint (step {validation.best_step}) was not saved; the adapter "
            f"of step {slot.step} is published instead",
            {"level": "warning", "best_step": validation.best_step},
        )
        return slot_state_dict(self.ctx.model, slot.job_id)
