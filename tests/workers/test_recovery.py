"""Worker failure on a pack host, in bf16 (the production precision): a Ray Train worker of
this host (found through the host's own report, never by process name: other people train
on this machine) killed with SIGKILL after a checkpoint; the workers restart, the job
resumes from its checkpoint (not from step 0), and its adapter equals an uninterrupted
one's bit for bit. With no restarts left, the same kill fails the job as `infrastructure`.
(fp32 resume after a kill, with a late join, is tests/workers/test_pack_host.py's.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from core.checkpoint_index import list_checkpoints
from core.host_protocol import AdmissionRequest, HostReport
from core.objectstore import ObjectStoreConfig, open_object_store
from core.run_states import RunJobState
from core.spec import LoraSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from tests.workers.conftest import (
    Watch,
    adapter,
    ended,
    for_tenant,
    free_placement_groups,
    host_spec,
    job,
    one_after_another,
    states,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]
SUCCEEDED, FAILED = RunJobState.SUCCEEDED, RunJobState.FAILED

JOB = job(
    "job-r",
    0,
    LoraSettings(r=4, alpha=8, dropout=0.1),
    n_epochs=10,
    learning_rate=5e-3,
    seed=9,
)


def kill_a_worker_of(report: HostReport) -> int:
    """SIGKILLs the last rank of exactly this host (the host reports its workers)."""
    pids = report["worker_pids"]
    assert len(pids) == 2, "the host reported no worker processes"
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


def test_a_killed_worker_costs_only_the_steps_since_the_last_checkpoint(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    hosts = RayHosts()
    spec = host_spec(
        tiny_base,
        store_config,
        tmp_path,
        "bf16",
        checkpoint_every_steps=10,
        checkpoint_keep_last=2,
        max_job_restarts=2,
        idle_seconds=60,
    )
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    killed = for_tenant(JOB, "killed-bf16", tiny_base)
    try:
        assert hosts.admit(spec.host_id, AdmissionRequest(killed)).admitted
        report = watch.until(
            lambda r: any(e["type"] == "checkpoint" for e in watch.events.get("job-r", []))
        )
        after_step = [e["data"]["step"] for e in watch.events["job-r"] if e["type"] == "checkpoint"]
        kill_a_worker_of(report)
        report = watch.until(ended("job-r"), timeout=400)
        assert states(report) == {"job-r": SUCCEEDED}
        interrupted = list(watch.events["job-r"])
        hosts.release(spec.host_id, "job-r")
        watch.until(lambda r: not r["jobs"])  # the release is not waited for
        # The uninterrupted reference, on the same host once it is whole again.
        clean = one_after_another(hosts, spec, [for_tenant(JOB, "clean-bf16", tiny_base)])
        assert clean.events["job-r"][-1]["type"] == "published"
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()

    messages = [e["message"] for e in interrupted]
    assert any("Workers restarted after a failure (restart 1" in m for m in messages), messages
    resumed = [
        e["data"]["resumed_from_step"]
        for e in interrupted
        if e["message"].startswith("Training started")
    ]
    assert resumed[0] is None and resumed[-1] >= after_step[-1] > 0
    steps = [e["data"]["step"] for e in interrupted if e["type"] == "metrics"]
    assert steps.count(1) == 1, "training started over from step 0"
    ours, reference = (
        adapter(store_config, "killed-bf16", "job-r"),
        adapter(store_config, "clean-bf16", "job-r"),
    )
    worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    assert worst == 0.0, f"resumed adapter differs from uninterrupted by {worst}"

    kept = list_checkpoints(open_object_store(store_config), "killed-bf16", "job-r")
    assert len(kept) == 2 and kept[0].step > kept[1].step


def test_a_worker_killed_with_no_restarts_left_fails_the_job_as_infrastructure(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path, max_job_restarts=0)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    try:
        request = AdmissionRequest(for_tenant(JOB, "no-restarts", tiny_base))
        assert hosts.admit(spec.host_id, request).admitted
        report = watch.until(lambda r: bool(watch.steps("job-r")))
        kill_a_worker_of(report)
        report = watch.until(ended("job-r"))
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()
    assert states(report) == {"job-r": FAILED}
    polled = report["jobs"]["job-r"]
    assert polled["error_code"] == "infrastructure", polled["error"]
