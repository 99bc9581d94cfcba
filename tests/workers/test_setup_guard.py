"""Setup fails instead of hanging: a phase stuck waiting on a stale build lock (torch's own
FileBaton, as DeepSpeed's op build uses it) ends at the time limit with an error naming the
phase; and a run's setup never waits on that lock in the first place."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

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


def test_a_run_never_waits_on_a_lock_in_the_ops_folder(
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
