"""What a training run is asked to do: plain, picklable values handed from the scheduler to Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.objectstore import ObjectStoreConfig


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"


@dataclass(frozen=True)
class TrainingSettings:
    n_epochs: int = 3
    batch_size: int = 4  # global: split across the run's workers
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    gradient_clip: float = 1.0  # 0 turns clipping off
    max_seq_len: int = 1024
    weight_decay: float = 0.0
    seed: int = 0
    # "bf16" | "fp32"; None: the run's default (bf16 on a GPU, fp32 on CPU).
    precision: str | None = None


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    tenant: str
    attempt: int
    base_model: str  # the catalog name, written into adapter_config.json
    base_model_uri: str  # local folder or s3:// URI of a Hugging Face model + tokenizer
    training_file_key: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    # Object-store folder of a PEFT adapter to start from (from_checkpoint), or None.
    start_from: str | None = None
    start_from_name: str | None = None


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    jobs: tuple[JobSpec, ...]
    num_workers: int
    use_gpu: bool
    object_store: ObjectStoreConfig
    model_cache_dir: Path
    storage_path: Path  # Ray Train's run folder (must be shared across nodes)
    zero3_param_persistence_threshold: int = 100_000
    checkpoint_every_steps: int = 50  # and at the end of every epoch; 0: epochs only
    checkpoint_keep_last: int = 3
    max_worker_restarts: int = 2  # Ray Train restarts the workers up to this many times
    # "bf16" | "fp32"; "" picks by device: bf16 on a GPU, fp32 on CPU. Explicit, so that bf16
    # runs on CPU in tests and fp32 on a GPU for debugging.
    precision: str = ""
    setup_timeout_seconds: float = 600.0  # per setup phase; past it the run fails, naming it
    # As a pack host's (core.host_protocol.HostSpec), from the same settings, so that a job
    # trains the same way in either scheduling mode.
    loss_chunk_tokens: int = 4096  # the loss's fp32 logits are made this many tokens at a time
    gradient_checkpointing: bool = False  # recompute the base's activations in backward

    def __post_init__(self) -> None:
        if not self.precision:
            object.__setattr__(self, "precision", "bf16" if self.use_gpu else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


PRECISIONS = ("bf16", "fp32")
