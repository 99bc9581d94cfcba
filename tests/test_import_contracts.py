"""The import contracts of `make lint` (pyproject.toml, [tool.importlinter]) hold: core/ and
an API replica import no torch, DeepSpeed, transformers, Ray, peft or workers/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout
    assert "3 kept, 0 broken" in done.stdout
