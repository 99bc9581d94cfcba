"""HTTP request and response bodies, in the shapes of OpenAI's fine-tuning API.

LoRA, training and resource settings are lorafleet extensions (`lora`, `training`,
`resources`), which the OpenAI SDK sends through `extra_body`. Unknown fields are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

T = TypeVar("T")


def _auto_is_none(value: Any) -> Any:
    return None if value == "auto" else value


def _auto(kind: type, **limits: Any) -> Any:
    """A number, or "auto" (lorafleet picks); "auto" is stored as None."""
    return Annotated[kind | None, Field(default=None, **limits), BeforeValidator(_auto_is_none)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Strict):
    n_epochs: _auto(int, ge=1, le=100)  # type: ignore[valid-type]
    batch_size: _auto(int, ge=1, le=1024)  # type: ignore[valid-type]
    learning_rate_multiplier: _auto(float, gt=0, le=100)  # type: ignore[valid-type]


class Supervised(Strict):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: _auto(float, gt=0, le=2)  # type: ignore[valid-type]


class Dpo(Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(Strict):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @model_validator(mode="after")
    def _one_method(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        return self

    @property
    def hyperparameters(self) -> Hyperparameters | None:
        chosen = self.dpo if self.type == "dpo" else self.supervised
        return chosen.hyperparameters if chosen else None


ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")]
# Text a database sees: bounded, and without NUL (PostgreSQL refuses it in text: a 500).
NO_NUL = r"^[^\x00]*$"


class LoraOptions(Strict):
    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(default=16.0, gt=0, description="Scale is alpha / r.")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[ModuleName] = Field(
        default="all-linear",
        description='Linear layers to adapt: "all-linear" or module names such as q_proj.',
    )


class TrainingOptions(Strict):
    max_seq_len: int | None = Field(default=None, ge=8, le=131072)
    n_evals: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Evaluations of validation_file on a sample over the run (default 10); "
        "the whole file is evaluated at the end.",
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Stop when the validation loss has not improved for this many "
        "evaluations; the best checkpoint becomes the adapter. Needs validation_file.",
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=1, description="Overrides learning_rate_multiplier."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] | None = Field(
        default=None,
        description="The learning rate after warm-up: linear or cosine decay to 0, or "
        "constant (transformers' schedules). Default linear.",
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, description="Steps of linear warm-up from 0. Default 0."
    )
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Warm-up as a fraction of all steps (rounded up); not with warmup_steps.",
    )
    train_on_inputs: bool | None = Field(
        default=None,
        description="Also train on prompts and user turns. Default false: only on "
        "completions and assistant turns.",
    )
    n_checkpoints: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Checkpoints saved evenly over the run and all kept, the last being the "
        "finished adapter. Default: one at each epoch's end, the newest few kept.",
    )
    gradient_clip: float | None = Field(
        default=None, ge=0, description="Max gradient norm (the job's own); 0 turns it off."
    )
    weight_decay: float | None = Field(
        default=None, ge=0, description="AdamW's decoupled weight decay. Default 0."
    )
    packing: bool = Field(default=True, description="May share a run with other jobs.")
    precision: Literal["bf16", "fp32"] | None = Field(
        default=None,
        description="Training precision; unset: LORAFLEET_PRECISION, else bf16 on a GPU, "
        "fp32 on CPU.",
    )

    @field_validator("warmup_ratio")
    @classmethod
    def _one_warmup(cls, ratio: float | None, info: ValidationInfo) -> float | None:
        if ratio is not None and info.data.get("warmup_steps") is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return ratio


class ResourceOptions(Strict):
    num_workers: int | None = Field(default=None, ge=1, le=1024)
    use_gpu: bool | None = Field(
        default=None, description="Unset: use GPUs if the cluster has them."
    )


class WandbOptions(Strict):
    """OpenAI's `wandb` integration: the W&B project (and optionally run name, entity and
    tags) the pack host logs the job's metrics to."""

    project: str = Field(min_length=1, max_length=128, pattern=NO_NUL)
    name: str | None = Field(default=None, max_length=128, pattern=NO_NUL)
    entity: str | None = Field(default=None, max_length=128, pattern=NO_NUL)
    tags: list[Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]] | None = Field(
        default=None, max_length=20
    )


class IntegrationOption(Strict):
    type: Literal["wandb"]
    wandb: WandbOptions


class FineTuningJobCreate(Strict):
    model: str = Field(min_length=1, max_length=256, pattern=NO_NUL)
    training_file: str = Field(min_length=1, max_length=64, pattern=NO_NUL)
    validation_file: str | None = Field(default=None, max_length=64, pattern=NO_NUL)
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: (
        dict[
            Annotated[str, Field(max_length=64, pattern=NO_NUL)],
            Annotated[str, Field(max_length=512, pattern=NO_NUL)],
        ]
        | None
    ) = Field(default=None, max_length=16)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method; still accepted."
    )
    integrations: list[IntegrationOption] | None = Field(
        default=None,
        max_length=1,
        description="Weights & Biases (`type: wandb`), where the server has `wandb` installed "
        "(the `wandb` extra); else the job is refused (400, param `integrations`).",
    )
    from_checkpoint: str | None = Field(
        default=None,
        max_length=128,
        pattern=NO_NUL,
        description="Start from a checkpoint (an id from GET …/{id}/checkpoints) of one of "
        "your jobs, with the same LoRA settings.",
    )
    lora: LoraOptions = Field(default_factory=LoraOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    resources: ResourceOptions = Field(default_factory=ResourceOptions)
    priority: int = Field(
        default=0,
        ge=-1000,
        le=1000,
        description="Orders your own waiting jobs: higher goes first. It never puts a job "
        "ahead of another tenant's (tenants take turns: fewest running first). Above 0 only "
        "up to the highest the operator allows your tenant; above it the job is refused "
        "(400, param `priority`).",
    )
    max_runtime: int | None = Field(
        default=None, gt=0, le=30 * 86400, description="Seconds; past it the job fails (timeout)."
    )


# ---- responses ----
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FileObject(BaseModel):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileDeleted(BaseModel):
    object: Literal["file"] = "file"
    id: str
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobDpoHyperparameters(JobHyperparameters):
    beta: float


class JobMethod(BaseModel):
    type: Literal["supervised", "dpo"] = "supervised"
    # {"hyperparameters": …} under the key of the job's method (OpenAI's shape).
    supervised: dict[str, JobHyperparameters] | None = None
    dpo: dict[str, JobDpoHyperparameters] | None = None


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    finished_at: int | None
    estimated_finish: int | None = None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    hyperparameters: JobHyperparameters
    method: JobMethod
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None = None
    user_provided_suffix: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    lora: dict[str, Any]
    training: dict[str, Any]
    resources: dict[str, Any]
    from_checkpoint: str | None = None
    priority: int = 0
    max_runtime: int | None = None
    # When its fine-tuned model was deleted (DELETE /v1/models/…); the job stays.
    model_deleted_at: int | None = None


class FineTuningJobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class FineTuningJobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class ModelObject(BaseModel):
    object: Literal["model"] = "model"
    id: str
    created: int
    owned_by: str


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False


class MergedFile(BaseModel):
    name: str
    size: int
    sha256: str
    url: str  # presigned (S3, 1 hour) or this API's own download route (local store)


class MergedWeights(BaseModel):
    """A job's adapter (or one checkpoint's) merged into its base at `scale`: `queued` or
    `running` (HTTP 202, ask again) until `succeeded` (200), with the files listed."""

    object: Literal["fine_tuning.job.merged_weights"] = "fine_tuning.job.merged_weights"
    fine_tuning_job_id: str
    checkpoint: str  # "final" (the job's adapter) or "step-{n}"
    scale: float
    status: Literal["queued", "running", "succeeded"]
    files: list[MergedFile]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
