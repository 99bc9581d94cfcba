"""README's configuration table names every setting (a new one is documented, a renamed one
is not left behind under its old name)."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
# Read elsewhere than Settings: the terminal client's options and the log format (api/ops.py).
NOT_SETTINGS = {"URL", "API_KEY", "LOG_FORMAT"}


def test_every_setting_is_in_the_readme_and_every_named_one_exists() -> None:
    text = README.read_text()
    missing = [f for f in Settings.model_fields if f"LORAFLEET_{f.upper()}" not in text]
    assert not missing, f"settings the README does not name: {missing}"
    named = set(re.findall(r"\bLORAFLEET_([A-Z0-9_]*[A-Z0-9])\b", text))
    unknown = sorted(n for n in named - NOT_SETTINGS if n.lower() not in Settings.model_fields)
    assert not unknown, f"README names settings that do not exist: {unknown}"
