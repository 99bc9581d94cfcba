"""`lorafleet hosts drain`: a target that names nothing is refused with a message (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app


def test_drain_of_nothing_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LORAFLEET_RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["hosts", "drain", "host-missing"])
    assert result.exit_code == 2, result.output
    # No Ray for this data dir (or, in a process already on one, no such host there).
    assert "lorafleet hosts drain: " in result.output
    assert "nothing to drain" in result.output or "no pack host host-missing" in result.output
