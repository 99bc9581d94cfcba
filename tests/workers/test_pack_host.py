"""A pack host on the real stack (Ray Train, 2 workers, DeepSpeed ZeRO-3, fp32), driven
directly through `orchestrator.scheduling.ray_hosts.RayHosts` (no scheduler): job A trains,
job B joins while A's step > 0 and leaves first; B's adapter equals B trained alone and A's equals A
trained alone (each alone on a host); a job whose data cannot load fails alone; a released
slot frees its tensors; an idle host ends. Then recovery: a worker killed after a late join
brings every member back from its own checkpoint, and both adapters still equal the ones
trained alone."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.fault_injection import StepFault
from core.host_protocol import AdmissionRequest, HostReport
from core.objectstore import ObjectStoreConfig
from core.run_states import RunJobState
from core.spec import LoraSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from tests.workers.conftest import (
    Watch,
    adapter,
    all_ended,
    for_tenant,
    free_placement_groups,
    host_spec,
    job,
    states,
    worst_difference,
)

pytestmark = [pytest.mark.slow, pytest.mark.long]
SUCCEEDED, FAILED, RUNNING = RunJobState.SUCCEEDED, RunJobState.FAILED, RunJobState.RUNNING


# A: long (24 steps), dropout on so its own random stream must survive the join and resume.
JOB_A = job(
    "job-a", 1, LoraSettings(r=8, alpha=16, dropout=0.1), n_epochs=6, learning_rate=5e-3, seed=2
)
# B: short (12 steps), a tight clip, a subset of the layers: joins late, leaves first.
JOB_B = job(
    "job-b",
    0,
    LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
    n_epochs=2,
    learning_rate=1e-2,
    gradient_clip=0.05,
    warmup_steps=1,
    seed=1,
)


@pytest.fixture(scope="module")
def alone(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, torch.Tensor]]:
    """A and B, each trained alone: one after the other on a pack host of their own, so
    nothing else is ever in the pack. (That a host trains a job as a one-shot run of its own
    does is the HTTP test's claim, tests/e2e/test_hosts_over_http.py.)"""
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path_factory.mktemp("alone"), idle_seconds=60)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    try:
        for job in (JOB_A, JOB_B):
            request = AdmissionRequest(for_tenant(job, "alone", tiny_base))
            assert hosts.admit(spec.host_id, request).admitted
            report = watch.until(
                lambda r, j=job.job_id: j in r["jobs"] and r["jobs"][j]["state"] != RUNNING  # type: ignore[misc]
            )
            assert report["jobs"][job.job_id]["state"] == SUCCEEDED, report
            metrics = [e for e in watch.events[job.job_id] if e["type"] == "metrics"]
            assert {e["data"]["pack_size"] for e in metrics} == {1}
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()
    return {j.job_id: adapter(store_config, "alone", j.job_id) for j in (JOB_A, JOB_B)}


def test_a_job_joins_a_running_pack_and_both_train_exactly_as_alone(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
    alone: dict[str, dict[str, torch.Tensor]],
) -> None:
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    a, b = for_tenant(JOB_A, "host", tiny_base), for_tenant(JOB_B, "host", tiny_base)
    broken = replace(a, job_id="job-broken", training_file_key="files/shared/missing.jsonl")
    assert hosts.admit(spec.host_id, AdmissionRequest(a)).admitted
    assert not hosts.admit(spec.host_id, AdmissionRequest(a)).admitted  # no double admit
    watch.until(lambda r: len(watch.steps("job-a")) >= 3)
    assert hosts.admit(spec.host_id, AdmissionRequest(b)).admitted
    assert hosts.admit(spec.host_id, AdmissionRequest(broken)).admitted
    report = watch.until(all_ended)

    assert states(report) == {"job-a": SUCCEEDED, "job-b": SUCCEEDED, "job-broken": FAILED}
    assert report["jobs"]["job-a"]["error"] is None
    assert "missing.jsonl" in (report["jobs"]["job-broken"]["error"] or "")
    [load_failed] = [e for e in watch.events["job-broken"] if e["type"] == "job_failed"]
    assert "Traceback" in load_failed["data"]["traceback"]  # the failing rank's own
    # B joined while A trained, and left first: A's pack went 1 → 2 → 1.
    sizes = [e["data"]["pack_size"] for e in watch.events["job-a"] if e["type"] == "metrics"]
    assert [s for i, s in enumerate(sizes) if i == 0 or sizes[i - 1] != s] == [1, 2, 1], sizes
    [b_started] = [e for e in watch.events["job-b"] if e["message"].startswith("Training started")]
    assert b_started["data"]["host_step"] >= 3
    assert watch.steps("job-a") == list(range(1, 25))
    assert watch.steps("job-b") == list(range(1, 13))

    for j in (a, b):
        worst = worst_difference(adapter(store_config, "host", j.job_id), alone[j.job_id])
        assert worst <= 1e-5, f"{j.job_id}: on the host differs from alone by {worst}"
    assert any(t.abs().max() > 1e-4 for k, t in alone["job-b"].items() if "lora_B" in k)

    # Every departed slot's factors and optimizer are gone; the host then idles out.
    assert report["memory"]["slot_bytes"] == {} or watch.poll()["memory"]["slot_bytes"] == {}
    assert watch.poll()["memory"]["lora_bytes_held"] == 0
    assert len(report["worker_pids"]) == 2 and report["worker_starts"] == 1
    for job_id in list(report["jobs"]):
        hosts.release(spec.host_id, job_id)
    final = watch.until(lambda r: not r["alive"], timeout=60)
    assert final["jobs"] == {} and final["ending"]
    assert not hosts.admit(spec.host_id, AdmissionRequest(replace(b, job_id="late"))).admitted
    assert spec.host_id in hosts.reap()
    free_placement_groups()


@pytest.mark.faults
def test_a_worker_killed_after_a_late_join_brings_every_member_back(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
    alone: dict[str, dict[str, torch.Tensor]],
) -> None:
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path, checkpoint_every_steps=2)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    a, b = for_tenant(JOB_A, "host-kill", tiny_base), for_tenant(JOB_B, "host-kill", tiny_base)
    assert hosts.admit(spec.host_id, AdmissionRequest(a)).admitted
    watch.until(lambda r: len(watch.steps("job-a")) >= 3)
    assert hosts.admit(spec.host_id, AdmissionRequest(b)).admitted

    def b_checkpointed(report: HostReport) -> bool:
        return any(e["type"] == "checkpoint" for e in watch.events.get("job-b", []))

    report = watch.until(b_checkpointed)
    os.kill(report["worker_pids"][1], signal.SIGKILL)
    report = watch.until(all_ended)

    assert states(report) == {"job-a": SUCCEEDED, "job-b": SUCCEEDED}
    assert report["worker_starts"] == 2
    for j in (a, b):
        resumed = [
            e["data"].get("resumed_from_step")
            for e in watch.events[j.job_id]
            if e["message"].startswith("Training started")
        ]
        assert len(resumed) == 2 and resumed[0] is None and resumed[1], (j.job_id, resumed)
        restarted = [e for e in watch.events[j.job_id] if "Workers restarted" in e["message"]]
        assert len(restarted) == 1
        worst = worst_difference(adapter(store_config, "host-kill", j.job_id), alone[j.job_id])
        assert worst <= 1e-5, f"{j.job_id}: after the kill differs from alone by {worst}"
    hosts.kill(spec.host_id)
    free_placement_groups()


def test_a_job_whose_step_raises_fails_alone_and_its_mates_train_as_alone(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
    alone: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Issue 17: X raises in its slot math inside the forward it shares with A (one rank only,
    mid-way through ZeRO-3's gathers), Y in its backward on the other rank. Both fail alone
    with their tracebacks; A and B finish equal to their solo twins, charged no restart."""
    tenant = "host-fault"
    x = replace(
        JOB_A, job_id="job-x", training=JOB_A.training.model_copy(update={"seed": 7})
    )  # A's width
    y = replace(JOB_B, job_id="job-y", training_file_key="files/shared/data-2.jsonl")
    faults = (
        StepFault("job-x", step=2, phase="forward", ranks=(1,)),
        StepFault("job-y", step=1, phase="backward", ranks=(0,)),
    )
    spec = host_spec(tiny_base, store_config, tmp_path, test_faults=faults)
    hosts = RayHosts()
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    for j in (JOB_A, x, y, JOB_B):
        assert hosts.admit(
            spec.host_id, AdmissionRequest(for_tenant(j, tenant, tiny_base))
        ).admitted
    report = watch.until(all_ended)

    assert states(report) == {
        "job-a": SUCCEEDED,
        "job-b": SUCCEEDED,
        "job-x": FAILED,
        "job-y": FAILED,
    }
    for job_id, phase, rank, step in (("job-x", "forward", 1, 2), ("job-y", "backward", 0, 1)):
        polled = report["jobs"][job_id]
        assert polled["error_code"] == "training_error"
        assert "InjectedFault" in (polled["error"] or "")
        [failed] = [e for e in watch.events[job_id] if e["type"] == "job_failed"]
        data = failed["data"]
        assert (data["phase"], data["rank"], data["step"]) == (phase, rank, step)
        assert data["error_code"] == "training_error"
        assert "Traceback" in data["traceback"] and "InjectedFault" in data["traceback"]
        assert watch.steps(job_id) == list(range(1, step + 1))
    # X raised inside the packed layers, mid-forward.
    [x_failed] = [e for e in watch.events["job-x"] if e["type"] == "job_failed"]
    assert "packed_layer.py" in x_failed["data"]["traceback"]

    assert report["worker_starts"] == 1  # no restart: nobody was charged one
    for j in (JOB_A, JOB_B):
        assert not [e for e in watch.events[j.job_id] if "Workers restarted" in e["message"]]
        worst = worst_difference(adapter(store_config, tenant, j.job_id), alone[j.job_id])
        print(f"{j.job_id}: max abs difference from alone = {worst}")
        assert worst <= 1e-5, f"{j.job_id}: beside failing mates differs from alone by {worst}"
    assert watch.steps("job-a") == list(range(1, 25)) and watch.steps("job-b") == list(range(1, 13))
    hosts.kill(spec.host_id)
    free_placement_groups()


@pytest.mark.faults
def test_a_job_that_crashes_the_workers_as_it_joins_fails_alone_and_its_mates_pay_nothing(
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
    alone: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Issue 17: X kills a worker process at its first step, every time it joins. The group
    restarts twice (the crash is X's: it never finished a step, its mates had); then X
    fails alone, and A and B, charged no restart, finish equal to their solo twins."""
    tenant = "host-crash"
    x = replace(JOB_B, job_id="job-x")
    crash = StepFault("job-x", step=0, phase="crash", ranks=(1,))
    spec = host_spec(
        tiny_base, store_config, tmp_path, checkpoint_every_steps=2, test_faults=(crash,)
    )
    hosts = RayHosts()
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    for j in (JOB_A, JOB_B):
        assert hosts.admit(
            spec.host_id, AdmissionRequest(for_tenant(j, tenant, tiny_base))
        ).admitted
    watch.until(lambda r: any(e["type"] == "checkpoint" for e in watch.events.get("job-b", [])))
    assert hosts.admit(spec.host_id, AdmissionRequest(for_tenant(x, tenant, tiny_base))).admitted
    report = watch.until(all_ended)

    assert states(report) == {"job-a": SUCCEEDED, "job-b": SUCCEEDED, "job-x": FAILED}
    assert report["worker_starts"] == 3
    x_report = report["jobs"]["job-x"]
    assert x_report["error_code"] == "training_error"
    assert "before this job finished a step" in (x_report["error"] or "")
    assert watch.steps("job-x") == []
    for j in (JOB_A, JOB_B):
        restarted = [e for e in watch.events[j.job_id] if "Workers restarted" in e["message"]]
        assert len(restarted) == 2 and all("not counted" in e["message"] for e in restarted)
        assert {e["data"]["restart"] for e in restarted} == {0}
        worst = worst_difference(adapter(store_config, tenant, j.job_id), alone[j.job_id])
        print(f"{j.job_id}: max abs difference from alone after X's crashes = {worst}")
        assert worst <= 1e-5, f"{j.job_id}: after X's crashes differs from alone by {worst}"
    hosts.kill(spec.host_id)
    free_placement_groups()
