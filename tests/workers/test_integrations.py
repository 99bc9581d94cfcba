"""A job's metrics logged to Weights & Biases by the host's integration runs (real wandb, in
offline mode: the run file is read back record by record)."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.job_settings import Integration, WandbSettings
from core.spec import JobSpec
from workers.host.integrations import IntegrationRuns, scalars

BLOCK = 32768  # W&B's run file is a LevelDB-style log of protobuf records in 32 KiB blocks


def run_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run's `.wandb` file (wandb 0.31 ships no reader)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_run(folder: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The run record and the history rows of the one offline run under `folder` (or the
    run's own folder), once its file holds the run's exit record: wandb's service process
    may still be writing it after `finish()` returns (seen on a loaded machine)."""
    (path,) = folder.glob("**/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:
        records = list(run_records(path))
        kinds = [record.WhichOneof("record_type") for record in records]
        if ("run" in kinds and "exit" in kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run, history = None, []
    for record, kind in zip(records, kinds, strict=True):
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return run, history


def metrics(step: int, loss: float) -> dict[str, Any]:
    data = {"step": step, "total_steps": 3, "train_loss": loss, "time": 1.0}
    return {"type": "metrics", "message": "", "data": {**data, "phase_seconds": {"forward": 0.5}}}


def test_scalars_keep_openai_names_and_flatten_phases() -> None:
    data = {"step": 4, "train_loss": 1.5, "valid_loss": 2, "pack_size": 3, "ok": True}
    data |= {"phase_seconds": {"forward": 0.25}, "dtypes": {"a": "fp32"}, "time": 9.0}
    assert scalars(data) == {
        "train_loss": 1.5,
        "valid_loss": 2.0,
        "pack_size": 3.0,
        "phase_seconds/forward": 0.25,
    }


def test_a_jobs_metrics_land_in_an_offline_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb = WandbSettings(project="sweeps", name="lr-1e-3", tags=("lr", "tiny"))
    job = JobSpec(
        job_id="ftjob-wb",
        tenant="acme",
        attempt=2,
        base_model="tiny",
        base_model_uri="/nowhere",
        training_file_key="k",
        integrations=(Integration(wandb=wandb),),
    )
    plain = dataclasses.replace(job, job_id="ftjob-plain", integrations=())
    runs = IntegrationRuns(tmp_path)
    other = {"type": "checkpoint", "message": "", "data": {"step": 2}}
    assert runs.log(job, [metrics(1, 3.0), other, metrics(2, 2.0)]) is None
    assert runs.log(job, [metrics(3, 1.0)]) is None
    assert runs.log(plain, [metrics(1, 3.0)]) is None  # no integration: nothing opened
    assert set(runs.runs) == {"ftjob-wb"}
    runs.finish("ftjob-wb")
    assert runs.runs == {}

    run, history = offline_run(tmp_path / "acme")  # under the tenant's folder
    assert (run.project, run.display_name, list(run.tags)) == ("sweeps", "lr-1e-3", ["lr", "tiny"])
    assert (run.run_id, run.run_group) == ("ftjob-wb-2", "ftjob-wb")
    assert [(row["_step"], row["train_loss"]) for row in history] == [(1, 3), (2, 2), (3, 1)]
    assert all(row["phase_seconds/forward"] == 0.5 for row in history)
