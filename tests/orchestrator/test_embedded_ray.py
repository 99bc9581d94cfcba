"""The embedded default's Ray, a process of its own recorded in the data dir: `lorafleet
ray-stop` ends it (every process of its session) when no serve will."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.scheduling import embedded_ray


def lorafleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_ray_stop_ends_the_ray_recorded_in_a_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    # As a SIGKILLed serve leaves it: a recorded Ray whose starter is gone (its own session).
    ray = embedded_ray.start_or_adopt(data_dir, num_cpus=1)
    try:
        processes = ray.processes()
        assert ray.pid in processes and len(processes) > 2  # head, GCS, raylet, …
        done = lorafleet("ray-stop", "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        assert f"pid {ray.pid}" in done.stdout
        assert not [pid for pid in processes if embedded_ray.process_alive(pid)]
        assert embedded_ray.session_pids(ray.pid) == []
        assert embedded_ray.read_record(data_dir) is None
        assert not Path(ray.temp_dir).exists()
        again = lorafleet("ray-stop", "--data-dir", str(data_dir))
        assert again.returncode == 0 and "nothing to end" in again.stdout
    finally:
        embedded_ray.stop(data_dir)  # if the test failed before ray-stop did


@pytest.mark.slow
@pytest.mark.faults
def test_a_scheduler_stopped_while_its_ray_starts_leaves_no_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.scheduling import ray_connection as connection_module
    from orchestrator.scheduling.ray_connection import RayConnection
    from orchestrator.settings import Settings
    from tests.conftest import wait_for_condition

    data_dir = tmp_path / "state"
    ray_connection = RayConnection(
        Settings(data_dir=data_dir, max_concurrent_runs=1, default_num_workers=1)
    )
    # Earlier tests of this session may have left this process a Ray driver (the session's
    # cluster); this scheduler connects as a fresh serve would, to its data dir's own Ray.
    monkeypatch.setattr(connection_module.ray, "is_initialized", lambda: False)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            ray_connection.connect()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - the test reads it
            outcome.append(error)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        # `ray start` runs (recorded from its first moment) but is not up yet: Ctrl-C on
        # serve lands here. (Its log file is opened before the process exists and the record
        # written after, so the record is what to wait for.)
        wait_for_condition(lambda: embedded_ray.read_record(data_dir) is not None, timeout=60)
        recorded = embedded_ray.read_record(data_dir)
        assert recorded is not None and recorded.alive()
        ray_connection.close()  # what a stopping scheduler does
        thread.join(timeout=120)
        assert isinstance(outcome[0], embedded_ray.StartAborted), outcome
        assert not recorded.alive() and embedded_ray.session_pids(recorded.pid) == []
        assert embedded_ray.read_record(data_dir) is None
        with pytest.raises(embedded_ray.StartAborted):
            ray_connection.connect()  # a tick after the stop starts no Ray
    finally:
        thread.join(timeout=120)
        embedded_ray.stop(data_dir)
