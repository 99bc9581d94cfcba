"""`bench/gpu_check.py --device cpu` keeps working in CI (it is the script run the day a GPU
is lent): bf16 (the precision a GPU trains in; fp32 is the other tests' default), packed
vs alone and resume bit for bit, dtypes as promised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_passes_on_cpu_and_prints_its_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--steps", "4",
         "--precision", "bf16", "--json", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"packed_vs_alone_max_abs"' in done.stdout
    reports = json.loads(report.read_text())
    assert [r["precision"] for r in reports] == ["bf16"]
    for r in reports:
        assert r["ok"] and r["resume_max_abs"] == 0.0 and not r["off_device"]
        assert set(r["packed_vs_alone_max_abs"].values()) == {0.0}
    assert reports[0]["dtypes"]["base"] == "torch.bfloat16"
