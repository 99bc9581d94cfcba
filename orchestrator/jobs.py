"""Fine-tuning jobs: creating one from a request, cancelling, pausing or resuming one, and
turning one into a run.

A job's settings (core/job_settings.py) are resolved at creation, but for what depends on the
cluster (at launch), and stored with it: what the job page shows is what the host trains.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.examples import PREFERENCE
from core.job_settings import (
    BASE_LEARNING_RATE,
    Integration,
    JobSettings,
    LoraSettings,
    PreferenceSettings,
    ResourceSettings,
    StartFrom,
    TrainingSettings,
)
from core.object_keys import adapter_prefix, checkpoint_prefix, file_key
from core.objectstore import ObjectStore
from core.publish import PublishError, store_adapter_archive, verify_adapter
from core.spec import JobSpec
from core.spec import TrainingSettings as HostTraining
from orchestrator.errors import Conflict, InvalidRequest, InvalidTransition, NotFound
from orchestrator.idempotency import Idempotency
from orchestrator.integrations import check_integrations
from orchestrator.scheduling.admission import max_priority
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore, new_id, now
from orchestrator.tables import JobRow


@dataclass
class NewJob:
    """A validated creation request; None means "auto" (lorafleet picks)."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    packing: bool = True
    from_checkpoint: str | None = None
    lora_given: bool = False
    priority: int = 0  # among waiting jobs, higher first
    max_runtime: int | None = None  # seconds; past it the job fails with `timeout`
    integrations: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape
    method: str = "supervised"  # or "dpo" (OpenAI's method.type)
    beta: float | None = None  # DPO's; None: the default


def resolve_settings(
    request: NewJob, default_num_workers: int, precision: str | None = None
) -> JobSettings:
    """The job's settings at creation: the request's values, else the defaults
    (core/job_settings.py); `precision` is the operator's default (LORAFLEET_PRECISION), if
    any. What depends on the cluster is left to launch."""
    defaults = TrainingSettings()
    multiplier = request.learning_rate_multiplier or defaults.learning_rate_multiplier
    training = {
        "n_epochs": request.n_epochs or defaults.n_epochs,
        "batch_size": request.batch_size or defaults.batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": BASE_LEARNING_RATE * multiplier,
        "precision": precision,
        "preference": _preference(request),
        **request.training,
    }
    return JobSettings(
        lora=LoraSettings(**request.lora),
        training=TrainingSettings(**training),
        resources=ResourceSettings(
            num_workers=request.resources.get("num_workers") or default_num_workers,
            use_gpu=request.resources.get("use_gpu"),
        ),
        packing=request.packing,
        integrations=tuple(Integration.model_validate(i) for i in request.integrations),
    )


def _preference(request: NewJob) -> PreferenceSettings | None:
    if request.method != "dpo":
        return None
    default = PreferenceSettings()
    return PreferenceSettings(beta=request.beta or default.beta)


def check_file_fits_method(param: str, file_id: str, file_format: str, method: str) -> None:
    """A DPO job trains on preference pairs only, a supervised job on anything else: the
    other way round is refused now rather than failed when the job starts."""
    wanted_preference = method == "dpo"
    if (file_format == PREFERENCE) == wanted_preference:
        return
    if wanted_preference:
        message = (
            f"{param} {file_id!r} is a {file_format} file; a dpo job needs preference data "
            "(input, preferred_output, non_preferred_output on each line)"
        )
    else:
        message = (
            f"{param} {file_id!r} holds preference pairs, which only a dpo job trains on "
            '(method: {"type": "dpo"})'
        )
    raise InvalidRequest(message, param=param, code="invalid_file")


def create_job(
    store: JobStore,
    settings: Settings,
    tenant: str,
    request: NewJob,
    idempotency: Idempotency | None = None,
    memory_check: Callable[[JobRow], None] | None = None,
) -> JobRow:
    """`memory_check` raises InvalidRequest for a job no host could ever hold
    (orchestrator.scheduling.sizing.HostSizing.refuse_if_never_fits): nothing is stored.
    The tenant's unfinished-jobs quota is checked and taken as the job is stored (RateLimited;
    JobStore.add_job), so concurrent creates never pass it together."""
    if request.model not in settings.base_models:
        known = ", ".join(sorted(settings.base_models)) or "none configured"
        raise InvalidRequest(
            f"model {request.model!r} is not a base model here (available: {known})",
            param="model",
            code="model_not_found",
        )
    allowed = max_priority(settings.tenant_max_priority, tenant)
    if request.priority > allowed:
        raise InvalidRequest(
            f"priority {request.priority} is above {allowed}, the highest priority this "
            "tenant may use (set by the operator)",
            param="priority",
        )
    for param in ("training_file", "validation_file"):
        file_id = getattr(request, param)
        if file_id is None:
            continue
        try:
            row = store.get_file(tenant, file_id, param)
        except NotFound as exc:
            raise InvalidRequest(
                f"{param} {file_id!r} does not exist", param=param, code="invalid_file"
            ) from exc
        if row.purpose != "fine-tune":
            raise InvalidRequest(
                f"{param} {file_id!r} has purpose {row.purpose!r}, not 'fine-tune'", param=param
            )
        check_file_fits_method(param, file_id, row.format, request.method)
    resolved = resolve_settings(request, settings.default_num_workers, settings.precision)
    check_integrations(resolved.integrations)
    if resolved.training.early_stopping_patience and request.validation_file is None:
        raise InvalidRequest(
            "training.early_stopping_patience needs a validation_file (it watches the "
            "validation loss)",
            param="training.early_stopping_patience",
        )
    if request.from_checkpoint:
        source, start = _checkpoint_source(store, tenant, request.from_checkpoint)
        if request.lora_given and resolved.lora != source.settings.lora:
            raise InvalidRequest(
                "lora must match the checkpoint's job (or be left out to inherit it)",
                param="lora",
            )
        if source.model != request.model:
            raise InvalidRequest(
                f"the checkpoint was trained on {source.model!r}, not {request.model!r}",
                param="model",
            )
        resolved = resolved.model_copy(
            update={"lora": source.settings.lora, "from_checkpoint": start}
        )
    job = JobRow(
        id=new_id("ftjob"),
        tenant=tenant,
        model=request.model,
        training_file=request.training_file,
        validation_file=request.validation_file,
        suffix=request.suffix,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        status=JobStatus.VALIDATING_FILES.value,
        attempt=0,
        created_at=now(),
        settings=resolved,
        user_metadata=request.metadata,
        event_cursor=0,
        priority=request.priority,
        max_runtime=request.max_runtime,
    )
    if memory_check is not None:
        memory_check(job)
    return store.add_job(
        job,
        f"Created fine-tuning job: {job.id}",
        idempotency,
        max_unfinished=settings.max_active_jobs_per_tenant,
    )


def _checkpoint_source(
    store: JobStore, tenant: str, checkpoint_id: str
) -> tuple[JobRow, StartFrom]:
    """The job a checkpoint id (`ftckpt-{job}-{step}`) belongs to, and where its adapter is."""
    body, _, step = checkpoint_id.removeprefix("ftckpt-").rpartition("-")
    try:
        source = store.get_job(tenant, f"ftjob-{body}")
    except NotFound as exc:
        raise InvalidRequest(
            f"from_checkpoint {checkpoint_id!r} does not exist", param="from_checkpoint"
        ) from exc
    if not step.isdigit():
        raise InvalidRequest(
            f"from_checkpoint {checkpoint_id!r} is not a checkpoint id", param="from_checkpoint"
        )
    final = store.last_metrics(source.id) or {}
    # The source's current attempt wrote both (a checkpoint of an older attempt is not
    # found, and the scheduler then fails the new job with invalid_checkpoint).
    if source.status == JobStatus.SUCCEEDED.value and int(final.get("step", -1)) == int(step):
        prefix = adapter_prefix(source.tenant, source.id, source.attempt)
    else:
        prefix = checkpoint_prefix(source.tenant, source.id, source.attempt, int(step))
    return source, StartFrom(checkpoint=checkpoint_id, adapter_prefix=prefix)


def cancel_job(store: JobStore, tenant: str, job_id: str) -> JobRow:
    """A job not yet running is cancelled at once; a running one is asked to stop."""
    job = store.get_job(tenant, job_id)
    status = JobStatus(job.status)
    if status in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED):
        return store.cancel(job_id)
    if status in (JobStatus.RUNNING, JobStatus.PAUSING):
        return store.request_cancel(job_id)
    if status == JobStatus.PAUSED:  # holds no slot: nothing to stop
        return store.cancel(job_id)
    if status == JobStatus.CANCELLING:
        return job
    raise Conflict(f"job {job_id} is already {status.value} and cannot be cancelled")


def pause_job(store: JobStore, tenant: str, job_id: str, by: dict[str, Any]) -> JobRow:
    """A running job is asked to pause: its host checkpoints it at the next step boundary
    and frees its slot (the scheduler moves it to paused). `by`: who asked (tenant, key)."""
    job = store.get_job(tenant, job_id)
    status = JobStatus(job.status)
    if status == JobStatus.PAUSING:
        return job
    if status != JobStatus.RUNNING:
        raise Conflict(f"job {job_id} is {status.value}; only a running job can be paused")
    try:
        return store.request_pause(job_id, by)
    except InvalidTransition as exc:  # it moved on between the read and the change
        raise Conflict(f"job {job_id} is {exc.current}; only a running job can be paused") from None


def resume_job(store: JobStore, tenant: str, job_id: str, by: dict[str, Any]) -> JobRow:
    """A paused job is queued again, to continue from the checkpoint it paused at."""
    job = store.get_job(tenant, job_id)
    status = JobStatus(job.status)
    if status != JobStatus.PAUSED:
        raise Conflict(f"job {job_id} is {status.value}; only a paused job can be resumed")
    try:
        return store.resume(job_id, by)
    except InvalidTransition as exc:
        raise Conflict(f"job {job_id} is {exc.current}; only a paused job can be resumed") from None


def archive_published_adapter(objects: ObjectStore, job: JobRow) -> str | None:
    """Checks the current attempt's adapter against its manifest (a stale attempt wrote
    elsewhere) and stores its download archive; returns what is wrong, if anything."""
    try:
        verify_adapter(objects, job.tenant, job.id, job.attempt)
        store_adapter_archive(objects, job.tenant, job.id, job.attempt, mtime=now())
    except PublishError as exc:
        return f"adapter was not published whole: {exc}"
    return None


def fine_tuned_model_name(job: JobRow) -> str:
    return f"ft:{job.model}:{job.suffix or ''}:{job.id}"


def job_spec_for(job: JobRow, settings: Settings) -> JobSpec:
    start = job.settings.from_checkpoint
    return JobSpec(
        job_id=job.id,
        tenant=job.tenant,
        attempt=job.attempt,
        base_model=job.model,
        base_model_uri=settings.base_models[job.model],
        training_file_key=file_key(job.tenant, job.training_file),
        validation_file_key=(
            file_key(job.tenant, job.validation_file) if job.validation_file else None
        ),
        lora=job.settings.lora,
        training=HostTraining(**job.settings.training.model_dump(), seed=job.seed),
        start_from=start.adapter_prefix if start else None,
        start_from_name=start.checkpoint if start else None,
        integrations=job.settings.integrations,
    )


def training_fields(settings: Settings) -> dict[str, Any]:
    """What a pack host takes from the settings (orchestrator.scheduling.placement.host_spec)."""
    assert settings.model_cache_dir is not None and settings.ray_storage_path is not None
    return {
        "object_store": settings.object_store_config,
        "model_cache_dir": Path(settings.model_cache_dir).resolve(),
        "storage_path": Path(settings.ray_storage_path).resolve(),
        "zero3_param_persistence_threshold": settings.zero3_param_persistence_threshold,
        "checkpoint_every_steps": settings.checkpoint_every_steps,
        "checkpoint_keep_last": settings.checkpoint_keep_last,
        "loss_chunk_tokens": settings.loss_chunk_tokens,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "wandb_dir": (settings.data_dir / "wandb").resolve(),
    }
