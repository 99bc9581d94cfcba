"""A job's results file: when it ends, its metrics per step as a CSV, stored as one of the
tenant's files (`purpose: fine-tune-results`, as OpenAI's) and named in `result_files`, so
`client.files.content(id)` returns it.

Built from the job's own metrics events (a training step's, and an evaluation's at the same
step): one row per step, the newest attempt's figures where a resumed attempt repeated one.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from typing import Any

from core.objectstore import ObjectStore
from orchestrator.store import JobStore, new_id, now
from orchestrator.tables import FileRow, JobRow

RESULTS_PURPOSE = "fine-tune-results"
# CSV column ← metrics event field.
COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_mean_token_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "lr": "learning_rate",
    "tokens_per_second": "tokens_per_second",
}


def results_key(tenant: str, file_id: str) -> str:
    return f"files/{tenant}/{file_id}.csv"


def results_csv(metrics: Iterable[dict[str, Any]]) -> tuple[bytes, int]:
    """(the CSV, its number of rows) from a job's metrics events' data, oldest first. A
    validation figure goes on its own step's row; one not measured there is left empty."""
    rows: dict[int, dict[str, Any]] = {}
    for data in metrics:
        if "step" not in data:
            continue
        row = rows.setdefault(int(data["step"]), {})
        # An evaluation adds its step's validation figures; a training step's event sets the
        # rest (a repeat, from a resumed attempt, replaces them).
        evaluation = "evaluation" in data
        if not evaluation:
            row.clear()
        for column, field in COLUMNS.items():
            if evaluation and not column.startswith("valid_"):
                continue
            value = data.get(field)
            if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
                row[column] = value
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({**rows[step], "step": step})
    return out.getvalue().encode(), len(rows)


def store_results_file(store: JobStore, objects: ObjectStore, job: JobRow) -> list[str]:
    """Writes the job's results CSV as a file of its tenant; its id (none: no step ran)."""
    metrics = [row.data or {} for row in store.events_since(job.id, 0) if row.type == "metrics"]
    if not metrics:
        return []
    body, steps = results_csv(metrics)
    file_id = new_id("file")
    key = results_key(job.tenant, file_id)
    objects.put_bytes(key, body)
    store.add_file(
        FileRow(
            id=file_id,
            tenant=job.tenant,
            filename=f"{job.id}-results.csv",
            purpose=RESULTS_PURPOSE,
            bytes=len(body),
            created_at=now(),
            object_key=key,
            format="csv",
            examples=steps,
        )
    )
    return [file_id]
