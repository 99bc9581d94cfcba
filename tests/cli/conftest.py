"""CLI tests run `lorafleet` against a real server (tests/e2e's `server` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from tests.e2e.conftest import LorafleetServer, server  # noqa: F401 - the shared fixture

DATA = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(2)]


@pytest.fixture()
def training_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in DATA))
    return path


def lorafleet(target: LorafleetServer, *args: str) -> tuple[int, str]:
    """Runs the CLI in this process against the server; (exit code, stdout)."""
    result = CliRunner().invoke(app, list(args), env={"LORAFLEET_URL": target.url})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout
