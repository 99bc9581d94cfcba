"""A job's resolved settings: one typed model, its defaults defined here and nowhere else.

Each field is resolved once, at a named moment, and stored with the job (the job object
shows the stored value, so what a user reads is what trains):

- at **creation** (`orchestrator.jobs.create_job`): everything the request gives or leaves to
  a default: LoRA shape, schedule, batch, sequence length, workers, packing, the checkpoint
  to start from;
- at **launch** (the job's first claim, `orchestrator.scheduling`): what depends on the
  cluster: `resources.use_gpu` (unset: a GPU if the cluster has one) and
  `training.precision` (unset: bf16 on a GPU, fp32 on CPU). Until then they are null on the
  job object; once set, a resumed attempt keeps them.

Stored as JSON with `version`; `JobSettings.stored(...)` reads every earlier version
(migration 0009 rewrote the rows, and a row written by an older server during a rolling
upgrade still reads). Torch-free: used by the API, the scheduler and the workers alike.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SETTINGS_VERSION = 2

Precision = Literal["bf16", "fp32"]
LrScheduler = Literal["linear", "cosine", "constant"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp32")
ALL_LINEAR = "all-linear"
BASE_LEARNING_RATE = 2e-4  # times learning_rate_multiplier, unless learning_rate is given


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSettings(_Frozen):
    """ΔW = (alpha / r) · B·A on each target module."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # "all-linear", or module names (a leaf name such as "q_proj" or a dotted suffix
    # such as "self_attn.q_proj").
    target_modules: tuple[str, ...] | str = ALL_LINEAR


class PreferenceSettings(_Frozen):
    """DPO (OpenAI's `method.type = "dpo"`): the sigmoid loss on preference pairs,
    -logsigmoid(beta · ((policy − reference) of preferred − (policy − reference) of
    non-preferred)), on summed completion log-probs (workers/training/preference_loss.py)."""

    beta: float = 0.1  # OpenAI's default: how far the adapter may move from the reference


class TrainingSettings(_Frozen):
    n_epochs: int = 3
    batch_size: int = 4  # global: split across the host's workers
    learning_rate_multiplier: float = 1.0
    learning_rate: float = BASE_LEARNING_RATE
    # The learning rate's shape over the run (workers/training/schedules.py: transformers'
    # own schedule functions), after a linear warm-up from 0 of `warmup_steps`, or of
    # `warmup_ratio` of all steps when that is set (the host knows the step count).
    lr_scheduler: LrScheduler = "linear"
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    # True: the loss is also on prompt and user tokens; False: only on what the model is
    # trained to write (completions, assistant turns).
    train_on_inputs: bool = False
    # How many checkpoints the job saves, evenly spaced over its run, and keeps (the last is
    # the finished adapter); None: at each epoch's end, the newest few kept.
    n_checkpoints: int | None = None
    gradient_clip: float = 1.0  # per job, over its own factors' gradients; 0 turns it off
    max_seq_len: int = 1024
    weight_decay: float = 0.0  # AdamW's decoupled weight decay on the LoRA factors
    # Evaluations on a sample of the validation file, evenly spaced over the run (the last
    # at its end, followed by one over the whole file); 0: only that one at the end.
    n_evals: int = 10
    # Stop once the sampled validation loss has not improved for this many evaluations, and
    # publish the best checkpoint; None: never stop early.
    early_stopping_patience: int | None = None
    precision: Precision | None = None  # resolved at launch (see the module docstring)
    # None: supervised (next-token loss); set: DPO on a preference file.
    preference: PreferenceSettings | None = None

    @property
    def method(self) -> Literal["supervised", "dpo"]:
        """OpenAI's name of the job's method."""
        return "supervised" if self.preference is None else "dpo"

    @property
    def rows_per_example(self) -> int:
        """Rows an example puts through the base: a DPO pair both its completions."""
        return 1 if self.preference is None else 2


class ResourceSettings(_Frozen):
    num_workers: int = 1
    use_gpu: bool | None = None  # resolved at launch


class StartFrom(_Frozen):
    """A checkpoint of another job of the tenant's to start from (`from_checkpoint`)."""

    checkpoint: str  # its public id, ftckpt-…
    adapter_prefix: str  # where its PEFT adapter is in the object store


class WandbSettings(_Frozen):
    """Where a job's metrics go in Weights & Biases (OpenAI's `integrations[].wandb`)."""

    project: str
    name: str | None = None  # the run's display name; None: the job's id
    entity: str | None = None  # team or user; None: the API key's default entity
    tags: tuple[str, ...] = ()


class Integration(_Frozen):
    """One of `integrations`: the pack host logs the job's metrics there as it trains."""

    type: Literal["wandb"] = "wandb"
    wandb: WandbSettings


class JobSettings(_Frozen):
    version: int = SETTINGS_VERSION
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    packing: bool = True  # False: a pack host of its own that admits no one else
    from_checkpoint: StartFrom | None = None
    integrations: tuple[Integration, ...] = ()

    @classmethod
    def stored(cls, data: dict[str, Any] | JobSettings) -> JobSettings:
        """The settings as a row stores them, from any version."""
        if isinstance(data, JobSettings):
            return data
        return cls.model_validate(upgrade(data))

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def launched(self, *, gpu: bool) -> JobSettings:
        """Resolves what depends on the cluster (at launch); what is set already stays."""
        use_gpu = self.resources.use_gpu if self.resources.use_gpu is not None else gpu
        precision = self.training.precision or ("bf16" if use_gpu else "fp32")
        return self.model_copy(
            update={
                "resources": self.resources.model_copy(update={"use_gpu": use_gpu}),
                "training": self.training.model_copy(update={"precision": precision}),
            }
        )

    @property
    def resolved_at_launch(self) -> bool:
        return self.resources.use_gpu is not None and self.training.precision is not None


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A stored settings dict of any version, as the current version."""
    data = dict(data)
    if data.get("version", 1) == 1:
        # Version 1 kept OpenAI's hyperparameters beside `training` (which repeated two of
        # them) and had no version.
        hyperparameters = data.pop("hyperparameters", None) or {}
        training = dict(data.get("training") or {})
        training.setdefault(
            "learning_rate_multiplier", hyperparameters.get("learning_rate_multiplier", 1.0)
        )
        training.pop("seed", None)
        data["training"] = training
        data["version"] = SETTINGS_VERSION
    return data
