"""A job's results CSV from its metrics events (orchestrator/results.py), pure."""

from __future__ import annotations

import csv
import io
from typing import Any

from orchestrator.results import results_csv


def test_one_row_per_step_with_validation_on_its_step_and_a_resumed_step_replaced() -> None:
    events: list[dict[str, Any]] = [
        {
            "step": 1,
            "train_loss": 2.0,
            "train_mean_token_accuracy": 0.1,
            "learning_rate": 1e-3,
            "tokens_per_second": 50.0,
            "step_seconds": 0.2,
        },
        {
            "step": 2,
            "train_loss": 1.9,
            "train_mean_token_accuracy": 0.2,
            "learning_rate": 1e-3,
            "tokens_per_second": 60.0,
        },
        {
            "step": 2,
            "train_loss": 1.9,
            "valid_loss": 2.5,
            "valid_mean_token_accuracy": 0.3,
            "evaluation": "sample",
        },
        # A resumed attempt repeats step 2 (its own figures win) and goes on.
        {"step": 2, "train_loss": 1.8, "learning_rate": 2e-3, "tokens_per_second": 70.0},
        {"step": 3, "train_loss": 1.5, "learning_rate": float("nan")},
        {"type": "no step"},
    ]
    body, steps = results_csv(events)
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert steps == 3 and [r["step"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "lr",
        "tokens_per_second",
    ]
    assert rows[0]["train_mean_token_accuracy"] == "0.1" and rows[0]["valid_loss"] == ""
    assert (rows[1]["train_loss"], rows[1]["lr"], rows[1]["valid_loss"]) == ("1.8", "0.002", "")
    assert rows[2]["lr"] == ""  # a figure that is not finite is left out
