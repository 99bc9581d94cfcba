"""One job's place in a pack: its data, batch plan, LoRA factors, optimizer and schedule.

Everything that makes a job train as if it were alone lives here, per job: its own seed
(data order, initialisation, dropout), its own AdamW state, learning-rate schedule,
gradient clipping and step count.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch
from torch import nn

from core.examples import parse_jsonl
from core.objectstore import ObjectStore
from core.spec import JobSpec
from workers.data.batching import micro_batch_per_rank, plan_batches, rank_share
from workers.data.tokenization import TokenizedExample, tokenize_example
from workers.host.evaluation import Validation, evaluation_steps, sample_indices
from workers.host.objective import Objective, Supervised, objective_for
from workers.lora.packed_layer import SlotConfig
from workers.training.schedules import schedule_of

# A job's own random streams (`JobSlot.generator`): its LoRA dropout masks and the
# initialisation of its factors, each seeded from the job's seed alone.
DROPOUT_STREAM, INIT_STREAM = 1, 2


class TrainingDataError(ValueError):
    """The job's data cannot be trained on (for example: nothing left after truncation)."""


class SlotState(str, Enum):
    TRAINING = "training"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class JobSlot:
    spec: JobSpec
    examples: list[TokenizedExample]
    batches: list[list[int]]
    micro_batch: int
    state: SlotState = SlotState.TRAINING
    step: int = 0
    trained_tokens: int = 0
    last_loss: float | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    schedule: Any = None
    last_accuracy: float | None = None  # train_mean_token_accuracy of the last step
    validation: Validation | None = None  # None: the job has no validation file
    applied_learning_rate: float = 0.0
    # What its rows are trained for: the next-token loss, or DPO (workers/host/objective.py).
    objective: Objective = field(default_factory=Supervised)

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    @property
    def evaluating(self) -> bool:
        """An evaluation of its adapter is under way: the job trains on once it is done."""
        return self.validation is not None and bool(self.validation.queue)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.total_steps // self.spec.training.n_epochs)

    def checkpoint_due(self, every_steps: int) -> bool:
        """After this step, at every `every_steps` and at each epoch's end (not the last
        step: the finished adapter itself is published then). A job that sets
        `n_checkpoints` has those instead: the steps ceil(i·total/n) for i < n, the n-th
        being its adapter."""
        if self.step >= self.total_steps:
            return False
        wanted = self.spec.training.n_checkpoints
        if wanted is not None:
            return (
                self.step * wanted // self.total_steps
                > (self.step - 1) * wanted // self.total_steps
            )
        periodic = every_steps > 0 and self.step % every_steps == 0
        return periodic or self.step % self.steps_per_epoch == 0

    @property
    def config(self) -> SlotConfig:
        lora = self.spec.lora
        return SlotConfig(name=self.job_id, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)

    def generator(self, purpose: int, device: torch.device | None = None) -> torch.Generator:
        """A random stream of this job's own, so packing never changes what it draws."""
        generator = torch.Generator(device=device or "cpu")
        generator.manual_seed(self.spec.training.seed * 1_000_003 + purpose)
        return generator

    def next_micro_batch(self, rank: int, world_size: int) -> list[TokenizedExample]:
        batch = self.batches[self.step]
        return [self.examples[i] for i in rank_share(batch, rank, world_size)]

    def next_rows(self, rank: int, world_size: int) -> list[TokenizedExample]:
        """The rows its next micro-batch puts through the base (a DPO pair gives two)."""
        return self.objective.rows(self.next_micro_batch(rank, world_size))

    def setup_optimizer(self, params: list[nn.Parameter]) -> None:
        training = self.spec.training
        self.params = params
        # Fused: one kernel over the job's tensors instead of a dozen small ops per tensor.
        # A pack runs one optimizer per job, so per-tensor overhead is paid K times a step.
        self.optimizer = torch.optim.AdamW(
            params, lr=training.learning_rate, weight_decay=training.weight_decay, fused=True
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule_of(training, self.total_steps)
        )

    def apply_gradients(self) -> float:
        """Clips this job's gradients by their own norm, then steps its optimizer."""
        assert self.optimizer is not None
        clip = self.spec.training.gradient_clip
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, clip if clip > 0 else float("inf"), foreach=True
        )
        self.applied_learning_rate = float(self.schedule.get_last_lr()[0])
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(norm)

    def training_state(self, **extra: Any) -> dict[str, Any]:
        """What a checkpoint needs beyond the factors to continue exactly where it was."""
        assert self.optimizer is not None
        return {
            "step": self.step,
            "trained_tokens": self.trained_tokens,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            **extra,
        }

    def restore(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.trained_tokens = state["step"], state["trained_tokens"]
        if self.validation is not None:
            self.validation.restore(state.get("validation"))

    @property
    def learning_rate(self) -> float:
        """The rate of the step just taken (its metrics event reports it), not of the next."""
        return self.applied_learning_rate


def load_job_slot(spec: JobSpec, store: ObjectStore, tokenizer: Any, world_size: int) -> JobSlot:
    """Reads, tokenizes and plans a job's data; raises on data that cannot be trained on."""
    training = spec.training
    examples = parse_jsonl(store.get_bytes(spec.training_file_key))
    tokenized = [
        tokenize_example(e, tokenizer, training.max_seq_len, training.train_on_inputs)
        for e in examples
    ]
    usable = [t for t in tokenized if t.trainable]
    if not usable:
        raise TrainingDataError(
            f"no example has a trained token within max_seq_len={training.max_seq_len}"
        )
    micro = micro_batch_per_rank(training.batch_size, world_size)
    batches = plan_batches(len(usable), micro * world_size, training.n_epochs, training.seed)
    slot = JobSlot(
        spec=spec,
        examples=usable,
        batches=batches,
        micro_batch=micro,
        objective=objective_for(spec),
    )
    slot.validation = load_validation(spec, store, tokenizer, slot.total_steps, world_size)
    return slot


def load_validation(
    spec: JobSpec, store: ObjectStore, tokenizer: Any, total_steps: int, world_size: int
) -> Validation | None:
    """The job's validation file, tokenized as its training file is; None when it has none."""
    if spec.validation_file_key is None:
        return None
    training = spec.training
    examples = parse_jsonl(store.get_bytes(spec.validation_file_key))
    tokenized = [
        tokenize_example(e, tokenizer, training.max_seq_len, training.train_on_inputs)
        for e in examples
    ]
    # A DPO job's validation loss is its preferred completions' next-token loss.
    usable = [replace(t, rejected=None) for t in tokenized if t.trainable]
    if not usable:
        raise TrainingDataError(
            "validation_file: no example has a trained token within "
            f"max_seq_len={training.max_seq_len}"
        )
    return Validation(
        examples=usable,
        sample=sample_indices(len(usable), training.seed),
        steps=evaluation_steps(total_steps, training.n_evals),
        # A chunk of the job's batch size per pack step: a forward without backward, a
        # fraction of what its pack-mates' step costs anyway.
        chunk_rows=max(training.batch_size, world_size),
        patience=training.early_stopping_patience,
    )
