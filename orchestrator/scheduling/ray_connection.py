"""The scheduler's connection to Ray: the cluster given by address, or the data dir's own
embedded one (started or adopted here, ended on a clean stop); joined in the namespace
`settings.ray_namespace`, where every pack host lives (`orchestrator.scheduling.ray_hosts`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray
from ray._private import ray_constants

from orchestrator.scheduling import embedded_ray
from orchestrator.scheduling.embedded_ray import EmbeddedRay
from orchestrator.settings import Settings


class RayConnection:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.ray_namespace
        self.embedded: EmbeddedRay | None = None  # the data dir's own Ray, when we use it
        self._closing = threading.Event()  # set: a Ray still starting is ended, none started
        self._connecting = threading.Lock()  # held while the data dir's Ray starts

    def connected(self) -> bool:
        """Whether this process is a driver of the cluster now (the scheduler's first tick
        connects; until then, and while it waits for the SQLite lock, it is not)."""
        return bool(ray.is_initialized())

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
            # Enough logical CPUs for the configured concurrent hosts, even on a small
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


def _init_driver(address: str, options: dict[str, Any]) -> None:
    # Ray's driver installs a C++ failure-signal handler that turns SIGTERM into an abort
    # (exit 134) once the Python handler ran: serve's clean shutdown (uvicorn's handler,
    # then ending the data dir's Ray) would never run. Set after `ray start` (if any), so
    # Ray's own processes keep their handler.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver connects
    ray.init(address=address, **options)
