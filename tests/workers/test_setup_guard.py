"""Setup fails instead of hanging: a phase stuck waiting on a stale build lock (torch's own
FileBaton, as DeepSpeed's op build uses it) ends at the time limit with an error naming the
phase; a host's setup never waits on that lock in the first place; and on a real pack host
a setup phase past `setup_timeout_seconds` fails the host's job with `setup_timeout`, naming
the phase, and the host ends (its restarted workers do not try again)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from core.host_protocol import AdmissionRequest
from core.objectstore import ObjectStoreConfig
from core.spec import LoraSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from tests.workers.conftest import (
    Watch,
    ended,
    for_tenant,
    free_placement_groups,
    host_spec,
    job,
)
from workers.runtime.setup_guard import SetupPhases, SetupTimeoutError


def test_a_phase_stuck_on_a_stale_build_lock_fails_naming_the_phase(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()  # left by a build killed half-way: nobody will ever release it
    told: list[tuple[str, str]] = []
    phases = SetupPhases(0.5, lambda phase, error: told.append((phase, error)))
    started = time.monotonic()
    expected = pytest.raises(SetupTimeoutError, match="setup phase 'distributed' took longer")
    with expected, phases.phase("distributed"):
        FileBaton(str(lock)).wait()  # what torch's extension loader does
    assert time.monotonic() - started < 5
    assert told and told[0][0] == "distributed" and "0.5 s" in told[0][1]


def test_a_phase_within_the_limit_is_untouched() -> None:
    told: list[tuple[str, str]] = []
    phases = SetupPhases(0.3, lambda phase, error: told.append((phase, error)))
    with phases.phase("jobs"):
        pass
    time.sleep(0.5)  # the timer was cancelled: nothing fires later
    assert not told and phases.timed_out is None


def test_a_host_never_waits_on_a_lock_in_the_ops_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepspeed.ops

    from workers.runtime import deepspeed_ops

    folder = tmp_path / "ops"
    (folder / deepspeed_ops.OP).mkdir(parents=True)
    (folder / deepspeed_ops.OP / f"{deepspeed_ops.OP}.so").touch()
    (folder / deepspeed_ops.OP / "lock").touch()
    monkeypatch.setattr(deepspeed_ops, "extensions_dir", lambda: folder)
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, deepspeed_ops.OP, True)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert not deepspeed_ops.use_prebuilt_ops()  # the op is switched off, not waited for
    assert deepspeed.ops.__compatible_ops__[deepspeed_ops.OP] is False
    (folder / deepspeed_ops.OP / "lock").unlink()
    deepspeed.ops.__compatible_ops__[deepspeed_ops.OP] = True
    assert deepspeed_ops.use_prebuilt_ops()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(folder)


@pytest.mark.slow
def test_a_host_past_its_setup_time_limit_fails_its_jobs_naming_the_phase(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    """A limit no real setup meets (50 ms: the workers' first phase alone imports DeepSpeed)
    stands for a phase that hangs: the job admitted while the host sets up fails with
    `setup_timeout` and an error naming the phase, and the host ends."""
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path, setup_timeout_seconds=0.05)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    one = for_tenant(job("job-s", 0, LoraSettings(r=2, alpha=2)), "setup", tiny_base)
    try:
        assert hosts.admit(spec.host_id, AdmissionRequest(one)).admitted
        report = watch.until(ended("job-s"), timeout=120)
        polled = report["jobs"]["job-s"]
        assert polled["error_code"] == "setup_timeout", polled
        assert "setup phase 'distributed' took longer than 0.05 s" in (polled["error"] or "")
        failed = [e for e in watch.events["job-s"] if e["type"] == "job_failed"]
        assert failed and failed[-1]["data"]["phase"] == "distributed"
        assert watch.until(lambda r: not r["alive"], timeout=120)["ending"]
        assert spec.host_id in hosts.reap()
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()
