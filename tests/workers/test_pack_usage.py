"""Usage per tenant on a real pack (issue 21, acceptance 6): two tenants' jobs of known batch
sizes (4 and 2 rows, every row the same tokens) in one pack host (Ray Train, 2 workers,
DeepSpeed ZeRO-3): while both train, each step's device-seconds split 2 : 1, by tokens; the
members' shares add up to the host's measured step time on its 2 devices (within 5%); alone,
a job has all of it; and the events, stored as the scheduler stores them, count each
tenant's tokens and device-seconds once in its usage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from core.examples import parse_jsonl
from core.host_protocol import AdmissionRequest
from core.objectstore import ObjectStoreConfig, open_object_store
from core.run_states import RunJobState
from core.spec import LoraSettings
from orchestrator.db import make_engine, migrate
from orchestrator.scheduling.ray_hosts import RayHosts
from orchestrator.store import JobStore
from orchestrator.usage import UsageStore
from tests.conftest import job_row
from tests.workers.conftest import (
    Watch,
    all_ended,
    for_tenant,
    free_placement_groups,
    host_spec,
    job,
    states,
)

pytestmark = [pytest.mark.slow, pytest.mark.long]
DEVICES = 2  # the host's workers (ranks)
ROW = {"text": "the same row, every time"}
DATA_KEY = "files/shared/usage-rows.jsonl"
# 16 identical rows: A (4 rows a step) trains 4 steps, B (2 rows a step) 8; both go live at
# the same host step, so their steps 1-4 are the same host steps.
JOB_A = job("usage-a", 0, LoraSettings(r=4, alpha=8), n_epochs=1, batch_size=4, seed=1)
JOB_B = job("usage-b", 0, LoraSettings(r=2, alpha=4), n_epochs=1, batch_size=2, seed=2)


def row_tokens(tiny_base: Path) -> int:
    from transformers import AutoTokenizer

    from workers.data.tokenization import tokenize_example

    [example] = parse_jsonl(json.dumps(ROW).encode())
    return len(tokenize_example(example, AutoTokenizer.from_pretrained(tiny_base), 48).input_ids)


def test_a_pack_of_two_tenants_splits_device_seconds_by_tokens(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
) -> None:
    open_object_store(store_config).put_bytes(DATA_KEY, "\n".join([json.dumps(ROW)] * 16).encode())
    a = replace(for_tenant(JOB_A, "acme", tiny_base), training_file_key=DATA_KEY)
    b = replace(for_tenant(JOB_B, "globex", tiny_base), training_file_key=DATA_KEY)
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path, checkpoint_every_steps=100)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    try:
        for one in (a, b):  # admitted together while the host loads: live at the same step
            assert hosts.admit(spec.host_id, AdmissionRequest(one)).admitted
        report = watch.until(all_ended)
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()
    assert set(states(report).values()) == {RunJobState.SUCCEEDED}, report

    steps = {
        job_id: {
            e["data"]["step"]: e["data"]
            for e in watch.events[job_id]
            if e["type"] == "metrics" and "device_seconds" in e["data"]
        }
        for job_id in ("usage-a", "usage-b")
    }
    per_row = row_tokens(tiny_base)
    assert sorted(steps["usage-a"]) == [1, 2, 3, 4]
    assert sorted(steps["usage-b"]) == list(range(1, 9))
    assert {m["step_tokens"] for m in steps["usage-a"].values()} == {4 * per_row}
    assert {m["step_tokens"] for m in steps["usage-b"].values()} == {2 * per_row}
    for step, mine in steps["usage-a"].items():
        theirs = steps["usage-b"][step]
        assert mine["pack_size"] == theirs["pack_size"] == 2
        assert mine["step_seconds"] == theirs["step_seconds"]  # the same host step
        measured = mine["step_seconds"] * DEVICES
        # Split by tokens: A's 4 rows have twice B's 2 rows' share.
        assert mine["device_seconds"] == pytest.approx(2 * theirs["device_seconds"], rel=1e-9)
        shares = mine["device_seconds"] + theirs["device_seconds"]
        assert abs(shares - measured) <= 0.05 * measured, (step, shares, measured)
        print(
            f"step {step}: measured {measured:.4f} device-s, shares "
            f"{mine['device_seconds']:.4f} + {theirs['device_seconds']:.4f} = {shares:.4f}"
        )
    for step in range(5, 9):  # B alone: the whole step is its own
        alone = steps["usage-b"][step]
        assert alone["pack_size"] == 1
        assert alone["device_seconds"] == pytest.approx(alone["step_seconds"] * DEVICES)

    # The events as the scheduler stores them: each tenant's usage, counted once.
    engine = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    store = JobStore(engine)
    for one in (a, b):
        store.add_job(job_row(id=one.job_id, tenant=one.tenant, status="running", attempt=1), "")
        events: list[dict[str, Any]] = watch.events[one.job_id]
        assert store.record_run_events(one.job_id, 1, events, cursor=len(events))
        assert not store.record_run_events(one.job_id, 1, events, cursor=len(events))
    totals = UsageStore(engine).totals()
    for one, tenant in ((a, "acme"), (b, "globex")):
        mine = list(steps[one.job_id].values())
        assert totals[tenant]["trained"] == sum(m["step_tokens"] for m in mine)
        assert totals[tenant]["trained"] == mine[-1]["trained_tokens"]
        assert totals[tenant]["device_seconds"] == pytest.approx(
            sum(m["device_seconds"] for m in mine)
        )
