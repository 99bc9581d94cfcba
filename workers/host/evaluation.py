"""A job's validation inside its pack: when it is evaluated, on what, and the forward that does it.

At `n_evals` evenly spaced steps (the last at its end) a job is evaluated on a fixed sample of
its validation file (`valid_loss`, `valid_mean_token_accuracy`), and at its end on the whole
file (`full_valid_loss`, `full_valid_mean_token_accuracy`): OpenAI's metric names.

An evaluation never changes an adapter: its forwards run without gradient, in eval mode (no
dropout, so no draw from the job's dropout stream), and its sample comes from a random
stream of its own. It never stalls the pack for long either: each pack step evaluates at most
`chunk_rows` validation rows of each evaluating job, so a large file is spread over many
steps. Meanwhile the evaluated job itself waits (its adapter must stay the one evaluated);
its pack-mates train on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from workers.data.tokenization import TokenizedExample, collate
from workers.training.chunked_loss import IGNORE_INDEX, chunked_loss_sum_and_accuracy

if TYPE_CHECKING:
    from workers.host.slot import JobSlot
    from workers.host.step import PackContext

# The sample evaluated `n_evals` times: the same rows each time, so the curve compares like
# with like (the whole file is evaluated once, at the end).
VALID_SAMPLE_EXAMPLES = 64
# The sample's random stream: its own, never one a job trains with (workers/host/slot.py).
SAMPLE_STREAM = 3

Kind = Literal["sample", "full"]


def evaluation_steps(total_steps: int, n_evals: int) -> frozenset[int]:
    """The steps after which the sample is evaluated: `n_evals` evenly spaced, the last one
    at the end (fewer when the run has fewer steps)."""
    if n_evals <= 0:
        return frozenset()
    return frozenset(math.ceil(k * total_steps / n_evals) for k in range(1, n_evals + 1))


def sample_indices(n_examples: int, seed: int, size: int = VALID_SAMPLE_EXAMPLES) -> list[int]:
    """A fixed sample of the validation rows (all of them when the file is small)."""
    if n_examples <= size:
        return list(range(n_examples))
    return sorted(random.Random(seed * 1_000_003 + SAMPLE_STREAM).sample(range(n_examples), size))


@dataclass
class Evaluation:
    """One pass over some validation rows, made in chunks across pack steps."""

    kind: Kind
    step: int
    indices: list[int]
    position: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, right, tokens

    @property
    def done(self) -> bool:
        return self.position >= len(self.indices)

    def metrics(self) -> dict[str, float]:
        loss, right, tokens = self.sums
        prefix = "valid" if self.kind == "sample" else "full_valid"
        return {
            f"{prefix}_loss": loss / tokens if tokens else math.nan,
            f"{prefix}_mean_token_accuracy": right / tokens if tokens else math.nan,
        }


@dataclass
class Validation:
    """A job's validation file and where its evaluations stand (the same on every rank)."""

    examples: list[TokenizedExample]
    sample: list[int]
    steps: frozenset[int]
    chunk_rows: int  # validation rows per pack step, over all ranks
    patience: int | None = None  # early stopping; None: off
    queue: list[Evaluation] = field(default_factory=list)
    latest: dict[str, float] = field(default_factory=dict)  # the newest of each metric
    best_loss: float | None = None
    best_step: int | None = None
    since_best: int = 0  # sample evaluations without improvement
    stopped_early: bool = False
    done_step: int | None = None  # the step whose evaluations all finished last
    best_factors: dict[str, torch.Tensor] | None = None  # rank 0: a copy, for publishing
    best_metrics: dict[str, Any] = field(default_factory=dict)  # the best step's figures

    def due(self, step: int, total_steps: int) -> bool:
        return step in self.steps or step == total_steps

    def start(self, step: int, total_steps: int) -> None:
        if step in self.steps:
            self.queue.append(Evaluation("sample", step, self.sample))
        if step == total_steps:
            self.queue.append(Evaluation("full", step, list(range(len(self.examples)))))

    def finish(self, evaluation: Evaluation) -> bool:
        """Takes a finished evaluation's figures; True when the sample's loss is the best so
        far and early stopping is on (the caller keeps this adapter as the best)."""
        self.latest.update(evaluation.metrics())
        if not self.queue:
            self.done_step = evaluation.step
        if evaluation.kind != "sample" or self.patience is None:
            return False
        loss = self.latest["valid_loss"]
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = loss, evaluation.step, 0
            return True
        self.since_best += 1
        self.stopped_early = self.since_best >= self.patience
        return False

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed job goes on counting from there."""
        return {
            "latest": dict(self.latest),
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "since_best": self.since_best,
            "done_step": self.done_step,
            "best_metrics": dict(self.best_metrics),
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.latest = dict(state["latest"])
            self.best_loss, self.best_step = state["best_loss"], state["best_step"]
            self.since_best, self.done_step = state["since_best"], state.get("done_step")
            self.best_metrics = dict(state.get("best_metrics") or {})


def evaluate_step(ctx: PackContext, slots: list[JobSlot]) -> list[tuple[JobSlot, Evaluation]]:
    """One chunk of each evaluating slot's current evaluation, each through the shared base
    without gradient; the sums are all-reduced once. Returns the evaluations this finished.
    A slot whose rows raise in the forward is failed alone (the ranks agree first)."""
    from workers.host.step import fail_slot

    if not slots:
        return []
    rows: list[torch.Tensor] = []
    chunks: list[list[int]] = []
    ctx.model.eval()  # no dropout: no draw from any job's stream
    try:
        with torch.no_grad():
            for slot in slots:
                validation = slot.validation
                assert validation is not None and validation.queue
                current = validation.queue[0]
                chunk = current.indices[current.position : current.position + validation.chunk_rows]
                chunks.append(chunk)
                rows.append(_chunk_sums(ctx, slot, [validation.examples[i] for i in chunk]))
    finally:
        ctx.model.train()
        ctx.routing.blocks = []
    sums = torch.stack(rows)
    dist.all_reduce(sums)
    finished = []
    for slot, chunk, (loss, right, tokens, failed) in zip(
        slots, chunks, sums.tolist(), strict=True
    ):
        validation = slot.validation
        assert validation is not None
        if failed:
            fail_slot(ctx, slot, RuntimeError("its validation forward failed"))
            continue
        current = validation.queue[0]
        current.position += len(chunk)
        current.sums = [a + b for a, b in zip(current.sums, [loss, right, tokens], strict=True)]
        if current.done:
            finished.append((slot, validation.queue.pop(0)))
    return finished


def _chunk_sums(ctx: PackContext, slot: JobSlot, chunk: list[TokenizedExample]) -> torch.Tensor:
    """[loss sum, tokens right, tokens, failed] of this rank's share of a chunk. Every rank
    makes the forward (a collective under ZeRO-3): one left without rows forwards a row
    whose tokens all are ignored, which adds nothing."""
    share = chunk[ctx.rank :: ctx.world_size] or [_ignored(chunk[0])]
    width = -(-max(len(e.input_ids) for e in share) // 16) * 16
    batch = {k: v.to(ctx.device) for k, v in collate(share, ctx.pad_token_id, width).items()}
    ctx.routing.blocks = [(slot.job_id, len(share))]
    ctx.routing.failures = {}
    ctx.routing.forward_id += 1
    logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    failed = slot.job_id in ctx.routing.failures
    ctx.routing.failures = None
    if failed:
        return torch.tensor([0.0, 0.0, 0.0, 1.0], device=ctx.device)
    sums = chunked_loss_sum_and_accuracy(logits, batch["labels"], ctx.loss_chunk_tokens)
    return torch.cat([sums, sums.new_zeros(1)])


def _ignored(example: TokenizedExample) -> TokenizedExample:
    return TokenizedExample(example.input_ids, [IGNORE_INDEX] * len(example.labels))
