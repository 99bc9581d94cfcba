"""Rank 0's writes to the object store, off the training path: publishing adapters and
writing checkpoints in a background thread, so a slow store never stalls the pack's step.

The step boundary only takes copies (the slot's factors, its optimizer state); the writes
run in order on one thread, and each reports its event (`published`, `checkpoint`) when it
is done, so a job is never seen as published before its manifest exists.

A store that is away does not lose a finished job: its adapter stays in memory here and
its publish is tried again with doubling waits for `publish_retry_seconds` (the job stays
running, and its events say so about once a minute); only past that window does the job
fail (`publish_failed`). A checkpoint that falls due meanwhile is skipped, with one event
per job and outage: the next one that falls due is tried, and a newer checkpoint of a job
replaces one still waiting in the queue.
"""

from __future__ import annotations

import copy
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.checkpoint_index import prune_checkpoints
from core.objectstore import ObjectStoreConfig, ObjectStoreUnavailable, open_object_store
from core.publish import Manifest, publish_adapter
from core.spec import JobSpec
from core.store_outage import RetryWindow
from workers.lora.peft_export import write_peft_adapter
from workers.training.checkpoints import write_checkpoint

Report = Callable[[str | None, str, str, dict[str, Any] | None], None]
# Tries of one S3 call before its write counts as failed (~1.5 s): the publish loop below
# owns the long wait, so its events count real tries and it notices the store's return soon.
STORE_RETRIES = 3


@dataclass
class _PendingCheckpoint:
    job: JobSpec
    paths: list[str]
    factors: dict[str, torch.Tensor]
    state: dict[str, Any]
    metrics: dict[str, Any]
    hand_back: bool = False  # the job left its slot: say so once this one is written


class PublishWindowOver(RuntimeError):
    """The store stayed away for the whole publish retry window."""


class SlotWriter:
    def __init__(
        self,
        store_config: ObjectStoreConfig,
        keep_last: int,
        report: Report,
        publish_retry_seconds: float = 600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = open_object_store(store_config, retries=STORE_RETRIES)
        self.keep_last = keep_last
        self.report = report
        self.publish_retry_seconds = publish_retry_seconds
        self.clock = clock
        self.sleep = sleep
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        # Guards `_checkpoints` and `_publishing`: the training thread adds, this one takes.
        self._lock = threading.Lock()
        # job -> its newest checkpoint not written yet (an older one waiting is dropped)
        self._checkpoints: dict[str, _PendingCheckpoint] = {}
        self._publishing: set[str] = set()  # jobs whose publish is queued or under way
        self._checkpoints_skipped: set[str] = set()  # told "skipped" in this outage
        self._thread = threading.Thread(target=self._run, name="slot-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            work()

    # ---- publishing ----------------------------------------------------------------------
    def publish(
        self, job: JobSpec, paths: list[str], factors: dict[str, torch.Tensor], extra: Any
    ) -> None:
        """Publishes a finished job's adapter from a copy of its factors."""
        window = RetryWindow(self.publish_retry_seconds, started_at=self.clock())
        with self._lock:
            self._publishing.add(job.job_id)

        def work() -> None:
            started = time.monotonic()  # publish_seconds: the scheduler's histogram
            try:
                with tempfile.TemporaryDirectory() as folder:
                    write_peft_adapter(factors, job, paths, Path(folder))
                    manifest = self._publish_within(window, job, Path(folder))
            except Exception as exc:  # noqa: BLE001 - reported as the job's failure
                self._published(job.job_id)
                code = "publish_failed" if isinstance(exc, PublishWindowOver) else "infrastructure"
                self.report(
                    job.job_id,
                    "job_failed",
                    f"Publishing failed: {type(exc).__name__}: {exc}",
                    {"error": str(exc), "error_code": code},
                )
                return
            self._published(job.job_id)
            data = {"files": manifest.files, "publish_seconds": time.monotonic() - started}
            message = "Adapter published"
            if window.failures:
                data["publish_attempts"] = window.failures + 1
                message += f" (attempt {window.failures + 1}, once the object store was back)"
            self.report(job.job_id, "published", message, {**data, **extra})

        self._queue.put(work)

    def publishing(self) -> list[str]:
        """Jobs done training whose adapter is not published yet (queued, or waiting for
        the store): the host owes them no step, so its watchdog must not count them."""
        with self._lock:
            return sorted(self._publishing)

    def _published(self, job_id: str) -> None:
        with self._lock:
            self._publishing.discard(job_id)

    def _publish_within(self, window: RetryWindow, job: JobSpec, folder: Path) -> Manifest:
        """Publishes the folder, trying again while the store is away and the window lasts."""
        while True:
            try:
                return publish_adapter(self.store, job.tenant, job.job_id, job.attempt, folder)
            except ObjectStoreUnavailable as exc:
                now = self.clock()
                delay = window.failed(now)
                if delay is None:
                    raise PublishWindowOver(
                        f"the object store was unavailable for {window.elapsed(now):.0f} s "
                        f"({window.failures} tries; LORAFLEET_PUBLISH_RETRY_SECONDS="
                        f"{self.publish_retry_seconds:g}): {exc}"
                    ) from exc
                if window.report_due(now):
                    self.report(
                        job.job_id,
                        "message",
                        "Object store unavailable; retrying publish "
                        f"(attempt {window.failures + 1}, next in {delay:.0f} s; the trained "
                        "adapter is kept until it is back, for up to "
                        f"{self.publish_retry_seconds:g} s)",
                        {
                            "level": "warning",
                            # Not "attempt": that key is the job's attempt in every event.
                            "publish_attempt": window.failures + 1,
                            "retry_in_seconds": delay,
                            "retry_window_seconds": self.publish_retry_seconds,
                            "error": str(exc),
                        },
                    )
                self.sleep(delay)

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint(
        self,
        job: JobSpec,
        paths: list[str],
        factors: dict[str, torch.Tensor],
        state: dict[str, Any],
        metrics: dict[str, Any],
        *,
        hand_back: bool = False,
    ) -> None:
        """Writes a checkpoint from copies taken at the step boundary (training goes on).
        `hand_back`: the job left the workers at this boundary (a pause, a drain); once the
        write is done its `handed_back` event names the step it continues from (or none, if
        the write failed: then it continues from its newest checkpoint)."""
        # The optimizer's tensors keep changing after this: a copy, taken now.
        pending = _PendingCheckpoint(
            job, paths, factors, copy.deepcopy(state), metrics, hand_back=hand_back
        )
        with self._lock:
            self._checkpoints[job.job_id] = pending
        self._queue.put(lambda: self._write_checkpoint(job.job_id))

    def _write_checkpoint(self, job_id: str) -> None:
        with self._lock:
            # None: a newer checkpoint of the job came and was written by an earlier turn.
            pending = self._checkpoints.pop(job_id, None)
        if pending is None:
            return
        saved = self._write(pending)
        if pending.hand_back:
            step = pending.state["step"] if saved else None
            self.report(job_id, "handed_back", "Checkpointed and left its slot", {"step": step})

    def _write(self, pending: _PendingCheckpoint) -> bool:
        """Writes one checkpoint; False (said in an event) when it could not be."""
        job, step = pending.job, pending.state["step"]
        job_id = job.job_id
        try:
            with tempfile.TemporaryDirectory() as folder:
                write_peft_adapter(pending.factors, job, pending.paths, Path(folder))
                info = write_checkpoint(
                    self.store,
                    job.tenant,
                    job.job_id,
                    step,
                    Path(folder),
                    pending.state,
                    pending.metrics,
                    created_at=int(time.time()),
                    attempt=job.attempt,
                )
            # A job that asked for n checkpoints keeps them all (n - 1 of them, and its adapter).
            keep = job.training.n_checkpoints or self.keep_last
            # Early stopping's best checkpoint so far is never pruned: it may be published.
            best = (pending.state.get("validation") or {}).get("best_step")
            prune_checkpoints(self.store, job.tenant, job.job_id, job.attempt, keep, best)
        except ObjectStoreUnavailable as exc:
            if job_id not in self._checkpoints_skipped:  # once per job and outage
                self._checkpoints_skipped.add(job_id)
                self.report(
                    job_id,
                    "message",
                    f"Object store unavailable; checkpoint at step {step} skipped (training "
                    "goes on, and each later checkpoint is tried when it falls due)",
                    {"level": "warning", "step": step, "error": str(exc)},
                )
            return False
        except Exception as exc:  # noqa: BLE001 - a missed checkpoint is not fatal
            self.report(
                job_id,
                "message",
                f"Checkpoint at step {step} not saved: {type(exc).__name__}: {exc}",
                {"level": "warning"},
            )
            return False
        self._checkpoints_skipped.discard(job_id)
        self.report(
            job_id,
            "checkpoint",
            f"Checkpoint saved at step {info.step}",
            {"step": info.step, "metrics": pending.metrics},
        )
        return True

    def close(self) -> None:
        """Waits for every write queued so far."""
        self._queue.put(None)
        self._thread.join()
