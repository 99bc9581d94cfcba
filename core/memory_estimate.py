"""How many bytes one rank of a pack host needs, from the base's config and the pack's jobs (pure).

Admission asks this before a job joins a running pack (orchestrator.scheduling.sizing): a join
that would not fit waits, so a join never runs the pack out of memory. A pack host computes
the same estimate for each membership it trains and reports it beside the peak it measured
(workers.runtime.live_tensor_bytes), so both sides use this one function. Pure arithmetic over the
base's config.json: no torch. Each term is what really takes memory on a rank here, and the
breakdown keeps its parts:

    base shard        all base parameters / world size              (ZeRO-3 partitions)
    live parameters   the largest module gathered whole, plus the prefetch bucket,
                      plus the parameters too small to partition (persistence threshold)
    activations       what autograd keeps for backward, per padded token of the step
                      (each job's rows are padded to its own width; jobs of different
                      widths take separate forward/backward passes, so the step's peak
                      is at most every job's rows × width together)
    logits            the output layer's logits and the fp32 loss, whole or per chunk
    LoRA state        each slot's factors, grads and two Adam moments, in fp32
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
# DeepSpeed's defaults (elements): stage3_prefetch_bucket_size, stage3_param_persistence_threshold.
DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_PERSISTENCE_THRESHOLD = 100_000
# Elements a decoder layer keeps for backward per token, by the width each one has
# (measured on a Llama layer with LoRA on every linear, sdpa attention, fp32; see
# tests/orchestrator/test_memory_estimate.py): norms and residuals in h, the MLP in i.
ACTIVATION_PER_HIDDEN = 6
ACTIVATION_PER_INTERMEDIATE = 4
ACTIVATION_PER_KV = 2
# The loss over the whole pack at once keeps, per token and vocabulary entry, the logits
# (model dtype) and three fp32 tensors: the upcast, the log-softmax and their gradient.
# In chunks (workers/training/chunked_loss.py), the logits and their gradient stay whole and the
# fp32 tensors exist for one chunk at a time.
LOSS_FP32_COPIES = 3
# Measured (tests/orchestrator/test_memory_estimate.py): a job with dropout keeps two fp32
# tensors of each adapted layer's input per token, the mask and the dropped input.
DROPOUT_FP32_COPIES = 2


@dataclass(frozen=True)
class BaseShape:
    """The sizes of a decoder-only base (Llama-like) that decide its memory."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaseShape:
        """From a Hugging Face `config.json` (as a dict)."""
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            vocab_size=int(config["vocab_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(config["intermediate_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """One decoder layer's linear layers: name -> (in features, out features)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameter_tensors(self) -> list[int]:
        """The element count of every base parameter tensor."""
        h = self.hidden_size
        layer = [a * b for a, b in self.linear_layers().values()] + [h, h]  # + two norms
        tensors = [self.vocab_size * h] + layer * self.num_layers + [h]  # embedding, final norm
        if not self.tie_embeddings:
            tensors.append(self.vocab_size * h)
        return tensors

    @property
    def parameter_count(self) -> int:
        return sum(self.parameter_tensors())

    @property
    def largest_module(self) -> int:
        """Elements of the biggest module ZeRO-3 gathers whole: the embedding or one layer."""
        layer = sum(a * b for a, b in self.linear_layers().values()) + 2 * self.hidden_size
        return max(self.vocab_size * self.hidden_size, layer)


@dataclass(frozen=True)
class SlotDemand:
    """What one job in the pack asks of every rank."""

    rows_per_rank: int  # its micro-batch on each rank
    seq_len: int  # its longest row (at most max_seq_len)
    lora_r: int
    target_modules: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.0

    def adapted_layers(self, base: BaseShape) -> list[tuple[int, int]]:
        """(in, out) features of each linear layer it adapts in one decoder layer."""
        layers = base.linear_layers()
        wanted = layers if self.target_modules == "all-linear" else self.target_modules
        return [layers[name] for name in wanted if name in layers]

    def lora_parameters(self, base: BaseShape) -> int:
        per_layer = sum(self.lora_r * (a + b) for a, b in self.adapted_layers(base))
        return per_layer * base.num_layers

    def dropout_bytes_per_token_layer(self, base: BaseShape) -> int:
        """LoRA dropout keeps, per adapted layer, its fp32 mask and the dropped fp32 input
        (what A's gradient needs) for the job's own rows; nothing without dropout."""
        if self.lora_dropout <= 0:
            return 0
        return sum(a for a, _ in self.adapted_layers(base)) * DROPOUT_FP32_COPIES * FP32


@dataclass(frozen=True)
class RunShape:
    """How the pack's ranks hold the base and run a step."""

    world_size: int
    precision: str = "fp32"
    partitioned: bool = True  # ZeRO-3; False: every rank holds the whole base (one process)
    gradient_checkpointing: bool = False
    logits_chunk_tokens: int | None = None  # None: the loss over all tokens at once
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET
    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD

    @property
    def element_bytes(self) -> int:
        if self.precision not in ELEMENT_BYTES:
            raise ValueError(f"precision must be one of {sorted(ELEMENT_BYTES)}")
        return ELEMENT_BYTES[self.precision]


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def slot_demand(
    *,
    batch_size: int,
    num_workers: int,
    max_seq_len: int,
    lora_r: int,
    target_modules: str | Sequence[str],
    lora_dropout: float = 0.0,
) -> SlotDemand:
    """What a job asks of each rank: its micro-batch (rank 0 gets the most rows: rows are
    dealt round-robin) at its longest rows, max_seq_len (its data is not read by admission:
    an upper bound, so a join never runs out of memory)."""
    return SlotDemand(
        rows_per_rank=max(1, -(-batch_size // num_workers)),
        seq_len=max_seq_len,
        lora_r=lora_r,
        target_modules=target_modules if isinstance(target_modules, str) else (*target_modules,),
        lora_dropout=lora_dropout,
    )


def host_run_shape(
    *,
    num_workers: int,
    precision: str,
    gradient_checkpointing: bool,
    loss_chunk_tokens: int | None,
    persistence_threshold: int,
) -> RunShape:
    """How a pack host runs its steps (ZeRO-3 over its workers), from its settings."""
    return RunShape(
        world_size=num_workers,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        logits_chunk_tokens=loss_chunk_tokens,
        persistence_threshold=persistence_threshold,
    )


def padded_tokens(slots: Sequence[SlotDemand]) -> int:
    """Padded tokens of a step on a rank: each job's rows at its own width. Jobs of one
    width share a forward, other widths come one after another, so this bounds the tokens
    live in one forward and backward from above (equal when all share a width)."""
    return sum(s.rows_per_rank * s.seq_len for s in slots)


def estimate_rank_bytes(
    base: BaseShape, run: RunShape, slots: Sequence[SlotDemand]
) -> MemoryEstimate:
    """Peak bytes on one rank during a training step of these slots together."""
    e = run.element_bytes
    params = base.parameter_tensors()
    if run.partitioned:
        persistent = sum(n for n in params if n < run.persistence_threshold)
        live = min(base.parameter_count, base.largest_module + run.prefetch_bucket)
        shard = base.parameter_count // run.world_size
        live_parameters = (min(live + persistent, base.parameter_count)) * e
    else:
        shard, live_parameters = base.parameter_count, 0
    tokens = padded_tokens(slots)
    h, i, kv = base.hidden_size, base.intermediate_size, base.kv_size
    per_token_layer = (
        ACTIVATION_PER_HIDDEN * h + ACTIVATION_PER_INTERMEDIATE * i + ACTIVATION_PER_KV * kv
    )
    # LoRA keeps its fp32 input copy (bf16 runs) and its rank-r middle per adapted layer.
    lora_middle = max((s.lora_r * len(base.linear_layers()) for s in slots), default=0)
    per_token_layer_bytes = per_token_layer * e + lora_middle * FP32
    dropout = sum(
        s.rows_per_rank * s.seq_len * s.dropout_bytes_per_token_layer(base) for s in slots
    )
    if run.gradient_checkpointing:
        # Only each layer's input is kept; one layer is recomputed whole during backward.
        activations = tokens * (base.num_layers * h * e + per_token_layer_bytes) + dropout
    else:
        activations = (tokens * per_token_layer_bytes + dropout) * base.num_layers
    vocab = base.vocab_size
    if run.logits_chunk_tokens is None:
        logits = tokens * vocab * (e + LOSS_FP32_COPIES * FP32)
    else:
        chunk = min(tokens, run.logits_chunk_tokens)
        logits = tokens * vocab * 2 * e + chunk * vocab * LOSS_FP32_COPIES * FP32
    # Factors, their grads and Adam's two moments: four fp32 copies per slot.
    lora_state = sum(s.lora_parameters(base) for s in slots) * 4 * FP32
    return MemoryEstimate(
        {
            "base_shard": shard * e,
            "live_parameters": live_parameters,
            "activations": activations,
            "logits": logits,
            "lora_state": lora_state,
        }
    )


def fits(
    base: BaseShape,
    run: RunShape,
    present: Sequence[SlotDemand],
    joining: SlotDemand,
    budget_bytes: int,
) -> bool:
    """Whether `joining` can join the slots already `present` within a rank's budget."""
    return estimate_rank_bytes(base, run, [*present, joining]).total <= budget_bytes
