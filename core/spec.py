"""What a job is trained with: plain, picklable values handed from the scheduler to a pack host."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.job_settings import Integration, LoraSettings
from core.job_settings import TrainingSettings as StoredTrainingSettings


class TrainingSettings(StoredTrainingSettings):
    """A job's training settings as a pack host trains them: those stored with the job
    (core/job_settings.py, where every default is defined) and the job's seed."""

    seed: int = 0


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    tenant: str
    attempt: int
    base_model: str  # the catalog name, written into adapter_config.json
    base_model_uri: str  # local folder or s3:// URI of a Hugging Face model + tokenizer
    training_file_key: str
    # The validation file's key, evaluated as the job trains (workers/host/evaluation.py).
    validation_file_key: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    # Object-store folder of a PEFT adapter to start from (from_checkpoint), or None.
    start_from: str | None = None
    start_from_name: str | None = None
    # Where the host also logs the job's metrics (workers/host/integrations.py).
    integrations: tuple[Integration, ...] = ()


__all__ = ["JobSpec", "LoraSettings", "TrainingSettings"]
