"""Training runs on Ray, as the scheduler sees them: launch, poll, stop, reap.

Each run is a detached actor named `lorafleet-run-{run_id}` in the namespace
`settings.ray_namespace`; nothing here is kept in memory, so a restarted scheduler finds
every run again by name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, Literal

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError, RayActorError

from core.spec import RunSpec
from orchestrator.scheduling import embedded_ray
from orchestrator.scheduling.embedded_ray import EmbeddedRay
from orchestrator.settings import Settings
from workers.run_actor import STOP_ALL, RunActor, run_actor_name
from workers.runtime.placement_groups import release_orphaned_placement_groups

START_TIMEOUT_S = 30
RUN_PREFIX = run_actor_name("")
UNRESPONSIVE: Literal["unresponsive"] = "unresponsive"
# What a poll found: the job's state and new events; None: the run is gone; UNRESPONSIVE:
# the run did not answer in time (it may be busy or hung; the scheduler decides).
Polled = dict[str, Any] | None | Literal["unresponsive"]


class RayRuns:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.ray_namespace
        self.embedded: EmbeddedRay | None = None  # the data dir's own Ray, when we use it
        self._closing = threading.Event()  # set: a Ray still starting is ended, none started
        self._connecting = threading.Lock()  # held while the data dir's Ray starts

    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS")
        options: dict[str, Any] = {"namespace": self.namespace, "log_to_driver": False}
        if address:
            _init_driver(address, options)
        else:
            # The data dir's own local cluster, in a process of its own: it (and every warm
            # pack host on it) outlives a crash of this process, and the next one reconnects.
            # Enough logical CPUs for the configured concurrent runs, even on a small
            # machine (workers then share cores rather than wait in line).
            cpus = max(
                os.cpu_count() or 1,
                self.settings.default_num_workers * self.settings.max_concurrent_runs,
            )
            with self._connecting:
                self.embedded = embedded_ray.start_or_adopt(
                    self.settings.data_dir, cpus, abort=self._closing
                )
            _init_driver(self.embedded.address, options)

    def abandon_start(self) -> None:
        """Stopping: a data dir's Ray still starting is ended at once (not after its start)."""
        self._closing.set()

    def close(self) -> None:
        """On a clean shutdown: ends the data dir's own Ray if this process used it (a Ray
        given by address belongs to someone else and is left alone)."""
        self.abandon_start()
        with self._connecting:  # a start under way has ended what it started, or finished
            pass
        if self.embedded is None:
            return
        ray.shutdown()
        embedded_ray.stop(self.settings.data_dir)
        self.embedded = None

    def gpu_available(self) -> bool:
        return float(ray.cluster_resources().get("GPU", 0)) > 0

    def _actor(self, run_id: str) -> Any | None:
        try:
            return ray.get_actor(run_actor_name(run_id), namespace=self.namespace)
        except ValueError:
            return None

    def launch(self, spec: RunSpec) -> None:
        actor = RunActor.options(  # type: ignore[attr-defined]
            name=run_actor_name(spec.run_id), namespace=self.namespace, lifetime="detached"
        ).remote(spec)
        ray.get(actor.start.remote(), timeout=START_TIMEOUT_S)

    def poll(self, run_id: str, job_id: str, cursor: int) -> Polled:
        return self.poll_all([(run_id, job_id, cursor)])[job_id]

    def poll_all(self, jobs: Sequence[tuple[str, str, int]]) -> dict[str, Polled]:
        """Polls every (run id, job id, cursor) at once and waits for all of them together,
        at most `run_poll_timeout_seconds`: a slow or hung run costs its own jobs only (they
        come back UNRESPONSIVE), never the others, and never more than one wait per tick."""
        found: dict[str, Polled] = {}
        pending: dict[Any, str] = {}
        for run_id, job_id, cursor in jobs:
            actor = self._actor(run_id)
            if actor is None:
                found[job_id] = None
            else:
                pending[actor.poll.remote(job_id, cursor)] = job_id
        if pending:
            ready, _ = ray.wait(
                list(pending),
                num_returns=len(pending),
                timeout=self.settings.run_poll_timeout_seconds,
            )
            for ref in ready:
                try:
                    found[pending[ref]] = ray.get(ref)
                except RayActorError:  # the actor died between lookup and answer
                    found[pending[ref]] = None
            for job_id in pending.values():
                if job_id not in found:
                    found[job_id] = UNRESPONSIVE
        return found

    def stop(self, run_id: str, job_id: str = STOP_ALL) -> None:
        actor = self._actor(run_id)
        if actor is not None:
            actor.stop.remote(job_id)

    def kill(self, run_id: str) -> None:
        """Ends a run that stopped answering (its jobs were requeued; it is fenced out)."""
        actor = self._actor(run_id)
        if actor is not None:
            ray.kill(actor)

    def reap(self, live_run_ids: set[str]) -> list[str]:
        """Removes run actors no live job needs once their fit() has returned (or once
        they no longer answer), then the placement groups of runs and hosts that are gone
        (`workers.runtime.placement_groups`: Ray may leave them reserved)."""
        reaped = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            # Whatever namespace this driver joined with, only ours, and only runs.
            if entry["namespace"] != self.namespace or not entry["name"].startswith(RUN_PREFIX):
                continue
            run_id = entry["name"].removeprefix(RUN_PREFIX)
            actor = self._actor(run_id)
            if run_id in live_run_ids or actor is None:
                continue
            try:
                finished = ray.get(
                    actor.finished.remote(), timeout=self.settings.run_poll_timeout_seconds
                )
            except (RayActorError, GetTimeoutError):
                finished = True
            if finished:
                ray.kill(actor)
                reaped.append(run_id)
        release_orphaned_placement_groups(self.namespace)
        return reaped


def _init_driver(address: str, options: dict[str, Any]) -> None:
    # Ray's driver installs a C++ failure-signal handler that turns SIGTERM into an abort
    # (exit 134) once the Python handler ran: serve's clean shutdown (uvicorn's handler,
    # then ending the data dir's Ray) would never run. Set after `ray start` (if any), so
    # Ray's own processes keep their handler.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver connects
    ray.init(address=address, **options)
