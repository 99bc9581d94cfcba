"""A job's `integrations` on its pack host: the metrics events the host records for it are
also logged to Weights & Biases, one W&B run per job attempt, opened at its first metrics event
and finished when the job leaves the host. With `WANDB_MODE=offline` (no network needed) the
run is written under the host's `wandb_dir` (data_dir/wandb), for `wandb sync` later.

Logging never stops training: a failure (no API key, W&B away) is said once in the job's
events and that job's logging stops; the run's other jobs are not touched.
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Any

from core.job_settings import WandbSettings
from core.spec import JobSpec

logger = logging.getLogger(__name__)
# Metrics event fields that are bookkeeping, not curves.
NOT_LOGGED = {"step", "total_steps", "time", "attempt", "dtypes"}


def wandb_settings(job: JobSpec) -> WandbSettings | None:
    return next((i.wandb for i in job.integrations if i.type == "wandb"), None)


def scalars(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics event's numbers, nested dicts flattened with '/' (phase_seconds/forward);
    what W&B draws as curves. OpenAI's names (train_loss, valid_loss, …) are kept as they are."""
    found: dict[str, float] = {}
    for key, value in data.items():
        if key in NOT_LOGGED and not prefix:
            continue
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            found[f"{prefix}{key}"] = float(value)
    return found


class IntegrationRuns:
    """The open W&B runs of one host's jobs. Called from the host's actor thread that takes
    the workers' events (after the membership has accepted them), never under its lock."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.runs: dict[str, Any] = {}  # job id -> its wandb Run
        self.failed: set[str] = set()  # job ids whose logging failed (said once, then off)

    def log(self, job: JobSpec, events: list[dict[str, Any]]) -> str | None:
        """Logs the job's metrics events; returns what went wrong, the first time only."""
        settings = wandb_settings(job)
        metrics = [e["data"] for e in events if e["type"] == "metrics" and e.get("data")]
        if settings is None or not metrics or job.job_id in self.failed:
            return None
        try:
            run = self.runs.get(job.job_id) or self._open(job, settings)
            for data in metrics:
                run.log(scalars(data), step=int(data["step"]))
        except Exception as exc:  # noqa: BLE001 - logging must never fail the training
            self.failed.add(job.job_id)
            self.runs.pop(job.job_id, None)
            return f"Weights & Biases logging stopped: {type(exc).__name__}: {exc}"[:1000]
        return None

    def _open(self, job: JobSpec, settings: WandbSettings) -> Any:
        import wandb  # the `wandb` extra; creation refused the job where it is missing

        folder = None
        if self.folder is not None:
            folder = self.folder / job.tenant
            folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or job.job_id,
            tags=list(settings.tags),
            # One W&B run per attempt: a retried attempt repeats steps from its checkpoint,
            # which W&B would drop from the first attempt's run. A pause keeps the attempt:
            # its job continues the same run after resume (from the step it paused at).
            id=f"{job.job_id}-{job.attempt}",
            resume="allow",
            group=job.job_id,
            dir=str(folder) if folder else None,
            config={
                "job_id": job.job_id,
                "base_model": job.base_model,
                "lora": job.lora.model_dump(mode="json"),
                "training": job.training.model_dump(mode="json"),
            },
            # Several jobs' runs at once in this one process.
            reinit="create_new",
        )
        self.runs[job.job_id] = run
        return run

    def finish(self, job_id: str, failed: bool = False) -> None:
        run = self.runs.pop(job_id, None)
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception:  # the job is done; its run's last flush is all that is lost
            logger.exception("finishing the W&B run of %s failed", job_id)

    def finish_all(self) -> None:
        for job_id in list(self.runs):
            self.finish(job_id, failed=True)
