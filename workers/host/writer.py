"""Rank 0's writes to the object store, off the training path: publishing adapters and
writing checkpoints in a background thread, so a slow store never stalls the pack's step.

The step boundary only takes copies (the slot's factors, its optimizer state); the writes
run in order on one thread, and each reports its event (`published`, `checkpoint`) when it
is done, so a job is never seen as published before its manifest exists.
"""

from __future__ import annotations

import copy
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.checkpoint_index import prune_checkpoints
from core.objectstore import ObjectStoreConfig, open_object_store
from core.publish import publish_adapter
from core.spec import JobSpec
from workers.lora.peft_export import write_peft_adapter
from workers.training.checkpoints import write_checkpoint

Report = Callable[[str | None, str, str, dict[str, Any] | None], None]


class SlotWriter:
    def __init__(self, store_config: ObjectStoreConfig, keep_last: int, report: Report) -> None:
        self.store = open_object_store(store_config)
        self.keep_last = keep_last
        self.report = report
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="slot-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            work()

    def publish(
        self, job: JobSpec, paths: list[str], factors: dict[str, torch.Tensor], extra: Any
    ) -> None:
        """Publishes a finished job's adapter from a copy of its factors."""

        def work() -> None:
            started = time.monotonic()  # publish_seconds: the scheduler's histogram
            try:
                with tempfile.TemporaryDirectory() as folder:
                    write_peft_adapter(factors, job, paths, Path(folder))
                    manifest = publish_adapter(
                        self.store, job.tenant, job.job_id, job.attempt, Path(folder)
                    )
            except Exception as exc:  # noqa: BLE001 - reported as the job's failure
                self.report(
                    job.job_id,
                    "job_failed",
                    f"Publishing failed: {type(exc).__name__}: {exc}",
                    {"error": str(exc), "error_code": "infrastructure"},
                )
                return
            self.report(
                job.job_id,
                "published",
                "Adapter published",
                {"files": manifest.files, "publish_seconds": time.monotonic() - started, **extra},
            )

        self._queue.put(work)

    def checkpoint(
        self,
        job: JobSpec,
        paths: list[str],
        factors: dict[str, torch.Tensor],
        state: dict[str, Any],
        metrics: dict[str, Any],
    ) -> None:
        """Writes a checkpoint from copies taken at the step boundary (training goes on)."""
        state = copy.deepcopy(state)  # the optimizer's tensors keep changing after this

        def work() -> None:
            try:
                with tempfile.TemporaryDirectory() as folder:
                    write_peft_adapter(factors, job, paths, Path(folder))
                    info = write_checkpoint(
                        self.store,
                        job.tenant,
                        job.job_id,
                        state["step"],
                        Path(folder),
                        state,
                        metrics,
                        created_at=int(time.time()),
                        attempt=job.attempt,
                    )
                prune_checkpoints(self.store, job.tenant, job.job_id, job.attempt, self.keep_last)
            except Exception as exc:  # noqa: BLE001 - a missed checkpoint is not fatal
                self.report(
                    job.job_id,
                    "message",
                    f"Checkpoint at step {state['step']} not saved: {type(exc).__name__}: {exc}",
                    {"level": "warning"},
                )
                return
            self.report(
                job.job_id,
                "checkpoint",
                f"Checkpoint saved at step {info.step}",
                {"step": info.step, "metrics": metrics},
            )

        self._queue.put(work)

    def close(self) -> None:
        """Waits for every write queued so far."""
        self._queue.put(None)
        self._thread.join()
