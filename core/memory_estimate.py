"""How many bytes one rank of a pack host needs, from the base's tensors and the pack's jobs (pure).

Admission asks this before a job joins a running pack (orchestrator.scheduling.sizing): a join
that would not fit waits, so a join never runs the pack out of memory. A pack host computes
the same estimate for each membership it trains and reports it beside the peak it measured
(workers.runtime.live_tensor_bytes), so both sides use this one function. Pure arithmetic over
the base's config.json and the shapes in its safetensors headers (`BaseShape.from_tensors`,
any architecture; `from_config` builds a Llama layout from the config alone): no torch. Each
term is what really takes memory on a rank here, and the breakdown keeps its parts:

    base shard        all base parameters / world size              (ZeRO-3 partitions)
    live parameters   the largest module gathered whole, plus the prefetch bucket,
                      plus the parameters too small to partition (persistence threshold)
    activations       what autograd keeps for backward, per padded token of the step
                      (each job's rows are padded to its own width; jobs of different
                      widths take separate forward/backward passes, so the step's peak
                      is at most every job's rows × width together)
    logits            the output layer's logits and the fp32 loss, whole or per chunk
    LoRA state        each slot's factors, grads and two Adam moments, in fp32
    dataset           each job's tokenized rows, which every rank holds whole (CPU only:
                      on a GPU they are not in the device's memory)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
# DeepSpeed's defaults (elements): stage3_prefetch_bucket_size, stage3_param_persistence_threshold.
DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_PERSISTENCE_THRESHOLD = 100_000
# Elements a decoder layer keeps for backward per token, by the width each one has
# (measured on a Llama layer with LoRA on every linear, sdpa attention, fp32; see
# tests/orchestrator/test_memory_estimate.py, which checks a Qwen2 layer too): norms and
# residuals in h, the MLP in i.
ACTIVATION_PER_HIDDEN = 6
ACTIVATION_PER_INTERMEDIATE = 4
ACTIVATION_PER_KV = 2
# The loss over the whole pack at once keeps, per token and vocabulary entry, the logits
# (model dtype) and three fp32 tensors: the upcast, the log-softmax and their gradient.
# In chunks (workers/training/chunked_loss.py), the logits and their gradient stay whole and the
# fp32 tensors exist for one chunk of one job's tokens at a time.
LOSS_FP32_COPIES = 3
# Measured (tests/orchestrator/test_memory_estimate.py): a job with dropout keeps two fp32
# tensors of each adapted layer's input per token, the mask and the dropped input.
DROPOUT_FP32_COPIES = 2
# A job's tokenized rows are Python lists on every rank (workers.data.tokenization): per token
# a pointer in the ids list and one in the labels list (8 B each) and an int object they share
# (32 B in CPython's allocator; ids below 257 are shared singletons, so this is the upper
# bound), and per row its two lists and the row object.
DATASET_BYTES_PER_TOKEN = 48
DATASET_BYTES_PER_ROW = 256
# Hugging Face's Conv1D (GPT-2 and its kin) stores a linear weight as (in, out), not nn.Linear's
# (out, in).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Weights that are not linear layers though 2-D: the output layer and embedding tables (as
# core.base_catalog and the workers' "all-linear" match them).
_NOT_LINEAR_LEAVES = ("lm_head", "wte", "wpe")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")

Linear = tuple[str, int, int]  # module path, in features, out features


@dataclass(frozen=True)
class BaseShape:
    """The sizes of a decoder-only base that decide its memory. `tensor_sizes`, `modules` and
    `linears` are what the base's files hold (from_tensors); empty, a Llama layout is assumed
    from the widths (from_config)."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool = False
    tensor_sizes: tuple[int, ...] = ()  # elements of every parameter tensor
    modules: tuple[int, ...] = ()  # elements of each thing ZeRO-3 gathers whole
    linears: tuple[Linear, ...] = ()  # every linear layer but the output layer

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaseShape:
        """From a Hugging Face `config.json` (as a dict), Llama's field names or GPT-2's."""
        hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
        heads = int(_first(config, "num_attention_heads", "n_head"))
        intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
        return cls(
            hidden_size=hidden,
            num_layers=int(_first(config, "num_hidden_layers", "n_layer")),
            vocab_size=int(config["vocab_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(intermediate),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_tensors(
        cls, config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]
    ) -> BaseShape:
        """From the config and the shape of every tensor in the base's safetensors files:
        parameters, linear layers (so any target names match what the base really has) and
        the modules ZeRO-3 gathers are the base's own; the widths of the activation terms
        come from the config."""
        widths = cls.from_config(config)
        conv1d = config.get("model_type") in CONV1D_MODEL_TYPES
        linears: list[Linear] = []
        per_layer: dict[str, int] = defaultdict(int)
        outside: list[int] = []
        for name, shape in sorted(shapes.items()):
            size = math.prod(shape)
            found = _LAYER_INDEX.search(name)
            if found:
                per_layer[name[: found.end()]] += size
            else:
                outside.append(size)
            path = name.removesuffix(".weight")
            leaf = path.rpartition(".")[2]
            if name.endswith(".weight") and len(shape) == 2:
                if leaf in _NOT_LINEAR_LEAVES or "embed" in leaf:
                    continue
                features_in, features_out = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
                linears.append((path, int(features_in), int(features_out)))
        if not shapes:
            raise ValueError("the base has no tensors")
        return replace(
            widths,
            num_layers=len(per_layer) or widths.num_layers,
            tensor_sizes=tuple(math.prod(s) for s in shapes.values()),
            modules=tuple([*per_layer.values(), *outside]),
            linears=tuple(linears),
        )

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """A Llama decoder layer's linear layers: name -> (in features, out features)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """Every linear layer but the output layer: module path -> (in, out) features."""
        if self.linears:
            return {path: (a, b) for path, a, b in self.linears}
        return {
            f"model.layers.{n}.{name}": features
            for n in range(self.num_layers)
            for name, features in self.layer_linears().items()
        }

    def parameter_tensors(self) -> list[int]:
        """The element count of every base parameter tensor."""
        if self.tensor_sizes:
            return list(self.tensor_sizes)
        h = self.hidden_size
        layer = [a * b for a, b in self.layer_linears().values()] + [h, h]  # + two norms
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
        if self.modules:
            return max(self.modules)
        layer = sum(a * b for a, b in self.layer_linears().values()) + 2 * self.hidden_size
        return max(self.vocab_size * self.hidden_size, layer)


def targets_match(path: str, targets: str | Sequence[str]) -> bool:
    """Whether a linear layer is adapted: "all-linear", or a target equal to its path or to
    its last components (`q_proj`, `self_attn.q_proj`), as peft and the workers match them."""
    if isinstance(targets, str):
        return targets == "all-linear" or path == targets or path.endswith(f".{targets}")
    return any(path == t or path.endswith(f".{t}") for t in targets)


@dataclass(frozen=True)
class SlotDemand:
    """What one job in the pack asks of every rank."""

    rows_per_rank: int  # its micro-batch on each rank
    seq_len: int  # its longest row (at most max_seq_len)
    lora_r: int
    target_modules: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.0
    dataset_rows: int = 0  # its training file's rows: every rank tokenizes and holds them all
    # The output layer (hidden -> vocabulary) adapted too: a Tinker model's `train_unembed`
    # (core.tinker_memory); a job's targets never include it ("all-linear" does not, as peft).
    adapts_output: bool = False

    def adapted_layers(self, base: BaseShape) -> list[tuple[int, int]]:
        """(in, out) features of every linear layer of the base it adapts."""
        output = [(base.hidden_size, base.vocab_size)] if self.adapts_output else []
        return [
            features
            for path, features in base.linear_layers().items()
            if targets_match(path, self.target_modules)
        ] + output

    def lora_parameters(self, base: BaseShape) -> int:
        return sum(self.lora_r * (a + b) for a, b in self.adapted_layers(base))

    def dropout_bytes_per_token(self, base: BaseShape) -> int:
        """LoRA dropout keeps, per adapted layer, its fp32 mask and the dropped fp32 input
        (what A's gradient needs) for the job's own rows; nothing without dropout."""
        if self.lora_dropout <= 0:
            return 0
        return sum(a for a, _ in self.adapted_layers(base)) * DROPOUT_FP32_COPIES * FP32

    @property
    def dataset_bytes(self) -> int:
        """Its tokenized rows at their longest (max_seq_len), held on every rank."""
        return self.dataset_rows * (self.seq_len * DATASET_BYTES_PER_TOKEN + DATASET_BYTES_PER_ROW)


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
    # On a GPU the budget is the device's: the tokenized rows sit in the node's memory.
    use_gpu: bool = False

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
    dataset_rows: int = 0,
) -> SlotDemand:
    """What a job asks of each rank: its micro-batch (rank 0 gets the most rows: rows are
    dealt round-robin) at its longest rows, max_seq_len (its data is not read by admission:
    an upper bound, so a join never runs out of memory), and its training file's rows."""
    return SlotDemand(
        rows_per_rank=max(1, -(-batch_size // num_workers)),
        seq_len=max_seq_len,
        lora_r=lora_r,
        target_modules=target_modules if isinstance(target_modules, str) else (*target_modules,),
        lora_dropout=lora_dropout,
        dataset_rows=dataset_rows,
    )


def host_run_shape(
    *,
    num_workers: int,
    precision: str,
    gradient_checkpointing: bool,
    loss_chunk_tokens: int | None,
    persistence_threshold: int,
    use_gpu: bool = False,
) -> RunShape:
    """How a pack host runs its steps (ZeRO-3 over its workers), from its settings."""
    return RunShape(
        world_size=num_workers,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        logits_chunk_tokens=loss_chunk_tokens,
        persistence_threshold=persistence_threshold,
        use_gpu=use_gpu,
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
    layers = max(1, base.num_layers)
    per_token_layer = (
        ACTIVATION_PER_HIDDEN * h + ACTIVATION_PER_INTERMEDIATE * i + ACTIVATION_PER_KV * kv
    )
    # LoRA keeps its fp32 input copy (bf16 runs) and its rank-r middle per adapted layer.
    lora_middle = max(
        (s.lora_r * -(-len(s.adapted_layers(base)) // layers) for s in slots), default=0
    )
    per_token_layer_bytes = per_token_layer * e + lora_middle * FP32
    dropout = sum(s.rows_per_rank * s.seq_len * s.dropout_bytes_per_token(base) for s in slots)
    if run.gradient_checkpointing:
        # Only each layer's input is kept; one layer is recomputed whole during backward.
        activations = tokens * (layers * h * e + per_token_layer_bytes) + dropout // layers
    else:
        activations = tokens * per_token_layer_bytes * layers + dropout
    vocab = base.vocab_size
    if run.logits_chunk_tokens is None:
        logits = tokens * vocab * (e + LOSS_FP32_COPIES * FP32)
    else:
        # Each job's loss is taken on its own rows, one job after another
        # (workers.host.step), so one chunk of one job's tokens is upcast at a time.
        chunk = max(
            (min(s.rows_per_rank * s.seq_len, run.logits_chunk_tokens) for s in slots), default=0
        )
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
            "dataset": 0 if run.use_gpu else sum(s.dataset_bytes for s in slots),
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


def _first(config: Mapping[str, Any], *names: str) -> Any:
    """The first of these config fields present (architectures name their widths differently)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise KeyError(f"config.json has none of {', '.join(names)}")
