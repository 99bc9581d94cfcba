"""Merged weights and model deletion, as the API asks for them and the scheduler runs them.

A merge request (`merged_weights`) answers at once: the listing when the merge's manifest is
in the store, else the state of its row, created `queued` by the first request. The API never
merges (a replica imports no training stack): `MergeScheduling`, on the scheduler's tick,
claims queued rows and starts each as a task on a `MergeRunner` (Ray: a task beside the pack
hosts, `orchestrator.scheduling.ray_merges`), and records how each ended.

Deleting a fine-tuned model (`delete_model`) marks its job (which stays) and removes its
adapter, checkpoints and merged weights from the store; its downloads then answer 404.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.merged_files import (
    FINAL,
    MergeOutcome,
    MergeRequest,
    canonical_scale,
    checkpoint_name,
    delete_job_outputs,
    merge_source_prefix,
    read_merged,
)
from core.object_keys import MANIFEST, checkpoint_prefix, merged_root
from core.objectstore import ObjectStore
from orchestrator.errors import Conflict, Forbidden, InvalidRequest, NotFound, RateLimited
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.store.merges import FAILED, SUCCEEDED, MergeStore
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)

# A running merge whose scheduler has not raised its heartbeat for this long is queued again
# (its scheduler went away); a live scheduler raises it every tick.
MERGE_STALE_S = 120.0


@dataclass(frozen=True)
class MergedFile:
    name: str
    size: int
    sha256: str
    key: str  # in the object store


@dataclass(frozen=True)
class MergedWeights:
    job_id: str
    checkpoint: str  # "final" or "step-{n}"
    scale: str
    status: str  # queued, running or succeeded
    files: list[MergedFile] = field(default_factory=list)


def merged_weights(
    store: JobStore,
    merges: MergeStore,
    objects: ObjectStore,
    settings: Settings,
    tenant: str,
    job_id: str,
    scale: float,
    checkpoint_id: str | None = None,
) -> MergedWeights:
    """The merged weights of a job's adapter (or of one of its checkpoints) at `scale`:
    listed when stored, else asked for (queued) and reported as they stand."""
    try:
        scale_text = canonical_scale(scale)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="scale") from exc
    job = downloadable_job(store, tenant, job_id)
    checkpoint = _checkpoint(store, objects, job, checkpoint_id)
    manifest = read_merged(objects, job.tenant, job.id, checkpoint, scale_text)
    if manifest is not None:
        prefix = f"{merged_root(job.tenant, job.id)}{checkpoint}/scale-{scale_text}/"
        files = [
            MergedFile(name, int(entry["size"]), str(entry["sha256"]), prefix + name)
            for name, entry in sorted(manifest.files.items())
        ]
        return MergedWeights(job.id, checkpoint, scale_text, SUCCEEDED, files)
    row = merges.get(job.id, checkpoint, scale_text)
    if row is None:
        _check_storage(merges, settings, tenant)
        row = merges.request(tenant, job.id, checkpoint, scale_text)
    if row.status == FAILED:
        merges.retry(row.id)  # the next request finds it queued again
        raise Conflict(
            f"merging {job.id} ({checkpoint}) at scale {scale_text} failed: {row.error}; "
            "asking again retries it",
            param="scale",
        )
    return MergedWeights(job.id, checkpoint, scale_text, row.status)


def merged_file_key(
    store: JobStore,
    objects: ObjectStore,
    tenant: str,
    job_id: str,
    scale: float,
    name: str,
    checkpoint_id: str | None = None,
) -> str:
    """The store key of one file of a finished merge (NotFound if it is not listed)."""
    try:
        scale_text = canonical_scale(scale)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="scale") from exc
    job = downloadable_job(store, tenant, job_id)
    checkpoint = _checkpoint(store, objects, job, checkpoint_id)
    manifest = read_merged(objects, job.tenant, job.id, checkpoint, scale_text)
    if manifest is None or name not in manifest.files:
        raise NotFound("merged file", name, "name")
    return f"{merged_root(job.tenant, job.id)}{checkpoint}/scale-{scale_text}/{name}"


def downloadable_job(store: JobStore, tenant: str, job_id: str) -> JobRow:
    """The job, unless its model was deleted: then everything it had to download is gone."""
    job = store.get_job(tenant, job_id)
    if job.model_deleted_at is not None:
        raise NotFound("model", job.fine_tuned_model or job_id)
    return job


def _checkpoint(
    store: JobStore, objects: ObjectStore, job: JobRow, checkpoint_id: str | None
) -> str:
    """ "final" (the published adapter) or "step-{n}" for a listed checkpoint id."""
    final_step = None
    if job.status == JobStatus.SUCCEEDED.value:
        final_step = int((store.last_metrics(job.id) or {}).get("step", -1))
    if checkpoint_id is None:
        if final_step is None:
            raise Conflict(
                f"job {job.id} is {job.status}; its merged weights exist once it has succeeded "
                "(or ask for one of its checkpoints)"
            )
        return FINAL
    body, _, step = checkpoint_id.removeprefix("ftckpt-").rpartition("-")
    if f"ftjob-{body}" != job.id or not step.isdigit():
        raise NotFound("checkpoint", checkpoint_id, "checkpoint_id")
    if final_step == int(step):
        return FINAL
    # The ids the checkpoint list shows are the current attempt's (api/routers/jobs.py).
    if not objects.exists(checkpoint_prefix(job.tenant, job.id, job.attempt, int(step)) + MANIFEST):
        raise NotFound("checkpoint", checkpoint_id, "checkpoint_id")
    return checkpoint_name(int(step))


def _check_storage(merges: MergeStore, settings: Settings, tenant: str) -> None:
    limit = settings.max_storage_bytes_per_tenant
    if limit is not None and merges.tenant_storage_bytes(tenant) >= limit:
        raise RateLimited(
            f"this tenant's storage (files and merged weights) is at its limit of {limit} "
            "bytes; delete files or models to merge more",
            param="scale",
        )


def delete_model(
    store: JobStore,
    merges: MergeStore,
    objects: ObjectStore,
    base_models: Collection[str],
    tenant: str,
    model_id: str,
) -> JobRow:
    """Marks the model's job deleted and removes what it stored. A model already deleted
    is NotFound, after its store objects are removed again (a deletion the store cut short
    is finished by the next one)."""
    job = store.model_job(tenant, model_id)
    if job is None:
        if model_id in base_models:
            raise Forbidden(f"{model_id} is a base model; only fine-tuned models can be deleted")
        raise NotFound("model", model_id, "model")
    already = job.model_deleted_at is not None
    if not already:
        job = store.mark_model_deleted(job.id)  # first: no new merge or download starts
    merges.delete_for_job(job.id)
    removed = delete_job_outputs(objects, job.tenant, job.id)
    log.info("model %s deleted: %d objects removed", model_id, removed)
    if already:
        raise NotFound("model", model_id, "model")
    return job


class MergeRunner(Protocol):
    """Where merges run (Ray in production: orchestrator.scheduling.ray_merges)."""

    def start(self, request: MergeRequest) -> None: ...
    def running(self) -> set[str]: ...
    def finished(self) -> list[MergeOutcome]: ...


class MergeScheduling:
    """The scheduler's part: records finished merges, keeps running ones alive, starts
    queued ones while fewer than `max_concurrent_merges` run here."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        merges: MergeStore,
        objects: ObjectStore,
        runner: MergeRunner,
    ) -> None:
        self.settings = settings
        self.store = store
        self.merges = merges
        self.objects = objects
        self.runner = runner

    def tick(self) -> None:
        for outcome in self.runner.finished():
            self._record(outcome)
        running = self.runner.running()
        self.merges.heartbeat(sorted(running))
        self.merges.requeue_stale(MERGE_STALE_S, keep=running)
        free = self.settings.max_concurrent_merges - len(running)
        for row in self.merges.queued(max(free, 0)):
            job = self.store.job(row.job_id)
            if not self.merges.claim(row.id):
                continue  # another scheduler took it
            if job.model_deleted_at is not None:
                self.merges.fail(row.id, "the model was deleted")
                continue
            assert self.settings.model_cache_dir is not None
            self.runner.start(
                MergeRequest(
                    merge_id=row.id,
                    tenant=row.tenant,
                    job_id=row.job_id,
                    checkpoint=row.checkpoint,
                    scale=row.scale,
                    adapter_prefix=merge_source_prefix(
                        job.tenant, job.id, job.attempt, row.checkpoint
                    ),
                    base_model_uri=self.settings.base_models.get(job.model, job.model),
                    object_store=self.settings.object_store_config,
                    model_cache_dir=Path(self.settings.model_cache_dir).resolve(),
                )
            )
            log.info(
                "merge %s of %s (%s, scale %s) started", row.id, job.id, row.checkpoint, row.scale
            )

    def _record(self, outcome: MergeOutcome) -> None:
        row = self.merges.by_id(outcome.merge_id)
        if row is None:  # its model was deleted meanwhile: what it wrote goes too
            job = self.store.job(outcome.job_id)
            delete_job_outputs(self.objects, job.tenant, job.id)
            return
        if outcome.error:
            log.warning("merge %s of %s failed: %s", row.id, row.job_id, outcome.error)
            self.merges.fail(row.id, outcome.error)
        else:
            log.info(
                "merge %s of %s done: %d bytes, peak tensor bytes %d",
                row.id,
                row.job_id,
                outcome.bytes,
                outcome.peak_tensor_bytes,
            )
            self.merges.finish(row.id, outcome.bytes)
        job = self.store.job(row.job_id)
        if job.model_deleted_at is not None:  # deleted while this merge was writing
            self.merges.delete_for_job(job.id)
            delete_job_outputs(self.objects, job.tenant, job.id)
