"""A job that fails in a pack step: its traceback reaches the worker's log, and its failure
is reported as that job's own event (the events' one path: the host's outbox, then the host
actor at the next step boundary)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from workers.host.step import PackContext, report_job_failure
from workers.lora.packed_layer import Routing


def test_a_job_failure_logs_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[tuple[Any, ...]] = []
    ctx = PackContext(
        model=torch.nn.Linear(1, 1),
        routing=Routing(),
        pad_token_id=0,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        report=lambda *args: sent.append(args),
    )
    try:
        raise ValueError("bad data in line 3")
    except ValueError as exc:
        with caplog.at_level(logging.ERROR, logger="lorafleet.worker"):
            report_job_failure(ctx, "job-1", exc)
    [record] = caplog.records
    assert record.exc_info is not None and "bad data in line 3" in caplog.text
    assert "Traceback" in caplog.text and "test_a_job_failure_logs_its_traceback" in caplog.text
    assert sent[0][:2] == ("job-1", "job_failed")
