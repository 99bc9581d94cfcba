"""What a completion samples from (issue 21): a base model by name, a tenant's fine-tuned
model (`ft:…`: its published adapter) or one of its checkpoints (`ftckpt-…`). Another
tenant's model or checkpoint is NotFound, as a deleted model's is."""

from __future__ import annotations

from collections.abc import Collection

from core.merged_files import merge_source_prefix
from core.objectstore import ObjectStore
from orchestrator.errors import NotFound
from orchestrator.merges import _checkpoint as listed_checkpoint  # "final" or "step-{n}"
from orchestrator.merges import downloadable_job
from orchestrator.store import JobStore


def sample_source(
    store: JobStore, objects: ObjectStore, base_models: Collection[str], tenant: str, model: str
) -> tuple[str, str | None]:
    """(base model, store prefix of the adapter to sample with, or None for the base)."""
    if model in base_models:
        return model, None
    if model.startswith("ftckpt-"):
        body = model.removeprefix("ftckpt-").rpartition("-")[0]
        try:
            job = downloadable_job(store, tenant, f"ftjob-{body}")
            checkpoint = listed_checkpoint(store, objects, job, model)
        except NotFound as exc:
            raise NotFound("checkpoint", model, "model") from exc
    else:
        found = store.model_job(tenant, model)
        if found is None or found.model_deleted_at is not None:
            raise NotFound("model", model, "model")
        job, checkpoint = found, "final"
    return job.model, merge_source_prefix(job.tenant, job.id, job.attempt, checkpoint)
