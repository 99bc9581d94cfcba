"""The embedded default's Ray, a process of its own recorded in the data dir: `lorafleet
ray-stop` ends it (every process of its session) when no serve will."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import embedded_ray


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
