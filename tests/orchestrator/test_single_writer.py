"""JobStore (orchestrator/store/) is the one writer to the database: no other module of the
control plane opens a write transaction or builds an INSERT/UPDATE/DELETE. Schema changes
(db.py's migrate, the Alembic migrations) are not row writes and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WRITES = {"update", "insert", "delete"}  # sqlalchemy statement builders
WRITE_METHODS = {"add", "add_all", "merge", "begin", "flush", "commit"}  # Session writes


def writes_in(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            found += [f"imports {a.name}" for a in node.names if a.name in WRITES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in WRITE_METHODS and "session" in owner.lower():
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
    return found


def modules_outside_the_store() -> list[Path]:
    paths = [*(ROOT / "orchestrator").glob("*.py"), *(ROOT / "api").rglob("*.py")]
    return sorted(p for p in paths if p.name != "db.py")


@pytest.mark.parametrize("path", modules_outside_the_store(), ids=lambda p: p.name)
def test_only_the_store_writes_to_the_database(path: Path) -> None:
    assert writes_in(path) == [], f"{path.relative_to(ROOT)} writes to the database"


@pytest.mark.parametrize("name", ["__init__.py", "webhooks.py"])
def test_the_check_sees_a_write(name: str) -> None:
    # So an empty answer above means something: the store's own modules do write.
    assert writes_in(ROOT / "orchestrator" / "store" / name)
