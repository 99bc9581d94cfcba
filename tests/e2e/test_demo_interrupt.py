"""`lorafleet demo` interrupted with Ctrl-C (SIGINT to its process group, as a terminal
sends it) once its server's Ray is up: nothing it started is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.scheduling import embedded_ray
from tests.conftest import wait_for_condition


@pytest.mark.slow
@pytest.mark.faults
def test_ctrl_c_on_the_demo_leaves_no_process_and_no_ray(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    state = folder / "state"
    output = tmp_path / "demo.out"
    with open(output, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "demo", "--folder", str(folder)],
            env={**_embedded_defaults(), "HF_HUB_OFFLINE": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, as in a terminal (pytest is spared)
            # Ctrl-C's default action, even if this test runs where SIGINT is ignored (a
            # background job): an ignored signal stays ignored across exec.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:

        def ray_up() -> bool:
            assert demo.poll() is None, output.read_text()
            recorded = embedded_ray.read_record(state)
            return recorded is not None and recorded.answers()

        wait_for_condition(ray_up, timeout=500, what="the demo server's Ray")
        ray = embedded_ray.read_record(state)
        assert ray is not None
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=300)
        text = output.read_text()
        assert demo.returncode == 130, text
        assert "Interrupted" in text and "Traceback" not in text, text
        # The demo, its server (its session) and the server's Ray (a session of its own).
        assert embedded_ray.session_pids(demo.pid) == [], "a process of the demo lives on"
        assert not ray.alive() and embedded_ray.session_pids(ray.pid) == []
        assert embedded_ray.read_record(state) is None
        assert not (folder / "base-model.partial").exists()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=30)
        embedded_ray.stop(state)


def _embedded_defaults() -> dict[str, str]:
    """This environment less any Ray or lorafleet setting: the demo's own defaults."""
    return {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("LORAFLEET_")
    }
