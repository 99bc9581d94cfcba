"""Recovery benchmark: what a crash costs, measured on the real stack.

- worker kill: SIGKILL of one Ray Train worker after a checkpoint; prints the time from the
  kill to the next training step, and the steps trained again (the kill step minus the
  step the job resumed from).
- control-plane kill: SIGKILL of `lorafleet serve` mid-run, then a restart; prints the time
  from the kill until the restarted server records the job's next step, and the steps lost
  (pack hosts live in detached Ray actors, so training itself never stops).

    .venv/bin/python bench/recovery.py
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from api.client import LorafleetClient
from api.server_process import ServerProcess
from core.host_protocol import AdmissionRequest, HostShape, HostSpec
from core.objectstore import ObjectStoreConfig, open_object_store
from core.run_states import NAMESPACE, RunJobState
from core.spec import JobSpec, LoraSettings, TrainingSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from workers.tiny_base import build_tiny_base

DATA = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(4)]


def worker_kill(folder: Path, base: Path) -> tuple[float, int]:
    store = ObjectStoreConfig(url=str(folder / "objects"))
    open_object_store(store).put_bytes("files/b/d.jsonl", "\n".join(map(json.dumps, DATA)).encode())
    job = JobSpec(
        job_id="job",
        tenant="b",
        attempt=1,
        base_model="tiny",
        base_model_uri=str(base),
        training_file_key="files/b/d.jsonl",
        lora=LoraSettings(r=8, alpha=16),
        training=TrainingSettings(n_epochs=40, batch_size=4, learning_rate=1e-3),
    )
    spec = HostSpec(
        host_id="recovery-worker",
        shape=HostShape("tiny", str(base), num_workers=2, use_gpu=False, precision="fp32"),
        object_store=store,
        model_cache_dir=folder / "cache",
        storage_path=folder / "ray",
        checkpoint_every_steps=20,
        max_slots=1,
        exclusive=True,
    )
    hosts = RayHosts()
    hosts.start_host(spec)
    assert hosts.admit(spec.host_id, AdmissionRequest(job)).admitted
    events: list[dict[str, Any]] = []
    killed_at = kill_step = None
    resumed_step = recovered_s = None
    while True:
        report = hosts.poll(spec.host_id, {"job": len(events)})
        assert report is not None, "the host disappeared"
        polled = report["jobs"]["job"]
        fresh = polled["events"]
        events.extend(dict(e) for e in fresh)
        for event in fresh:
            data = event.get("data") or {}
            # Mid-way between checkpoints (every 20 steps): 10 steps are expected to be redone.
            if event["type"] == "metrics" and killed_at is None and data["step"] == 50:
                # Exactly this host's last rank (never other people's training by name).
                os.kill(report["worker_pids"][-1], signal.SIGKILL)
                killed_at = time.perf_counter()
                kill_step = max(e["data"]["step"] for e in events if e["type"] == "metrics")
            if data.get("resumed_from_step") is not None:
                resumed_step = data["resumed_from_step"]
            if event["type"] == "metrics" and resumed_step is not None and recovered_s is None:
                assert killed_at is not None
                recovered_s = time.perf_counter() - killed_at
        if polled["state"] != RunJobState.RUNNING:
            break
        time.sleep(0.05)
    hosts.kill(spec.host_id)
    hosts.reap()
    assert polled["state"] == "succeeded", polled
    assert recovered_s is not None and kill_step is not None and resumed_step is not None
    return recovered_s, kill_step - resumed_step


def control_plane_kill(folder: Path, base: Path, ray_address: str) -> tuple[float, int]:
    server = ServerProcess.with_settings(
        folder / "server.log",
        data_dir=str(folder / "state"),
        base_models=json.dumps({"tiny": str(base)}),
        scheduler_poll_seconds="0.2",
        # A Ray of this machine only: its local folders are every node's.
        shared_paths=json.dumps([str(folder), str(base.parent)]),
    )
    server.env["RAY_ADDRESS"] = ray_address

    def steps(api: LorafleetClient, job_id: str) -> list[int]:
        return [e["data"]["step"] for e in api.events(job_id) if e["type"] == "metrics"]

    server.start()
    api = server.api()
    file_id = api.upload_records("d.jsonl", DATA)["id"]
    job = api.create_job(
        {"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 60}}
    )
    while len(steps(api, job["id"])) < 20:
        time.sleep(0.1)
    server.kill()
    killed_at = time.perf_counter()
    server.start(same_port=True)
    before = None
    while True:
        current = steps(api, job["id"])
        if before is None:
            before = max(current)
        elif max(current) > before:
            adopted_s = time.perf_counter() - killed_at
            break
        time.sleep(0.05)
    api.wait(job["id"])
    recorded = sorted(steps(api, job["id"]))
    server.stop()
    lost = recorded[-1] - len(set(recorded)) if recorded else 0  # steps with no metrics
    return adopted_s, lost


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="lorafleet-recovery-"))
    base = build_tiny_base(folder / "base")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
    )
    worker_s, worker_lost = worker_kill(folder, base)
    control_s, control_lost = control_plane_kill(
        folder, base, ray.get_runtime_context().gcs_address
    )
    ray.shutdown()
    print(f"worker kill: {worker_s:.1f} s from kill to the next step; {worker_lost} steps redone")
    print(f"control-plane kill: {control_s:.1f} s to the next recorded step; {control_lost} lost")


if __name__ == "__main__":
    main()
