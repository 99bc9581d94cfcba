"""Packing benchmark: K jobs of equal size in one pack vs the same jobs one after another.

Both sides run through the same code path, the one training path (a pack host on a local
Ray cluster: Ray Train, 2 workers, DeepSpeed ZeRO-3, the tiny Llama), side by side in one
run: packed, K jobs admitted together to a fresh host; sequential, each job alone on a fresh
host of its own (as `training.packing: false` trains), one after another. Printed per K:
end-to-end aggregate tokens/s (start-up included, as a user feels it), steady-state
tokens/s (training steps after each run's first WARMUP_STEPS), both ratios
packed/sequential, and peak RSS per rank.

    .venv/bin/python bench/packing.py [--ks 1,2,4,8] [--epochs 4]

The last line is `K=4 speedup=… step_speedup=… rss_ratio=…` (rss_ratio: packed K=4 / K=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from core.host_protocol import AdmissionRequest, HostShape, HostSpec
from core.objectstore import ObjectStoreConfig, open_object_store
from core.run_states import NAMESPACE, RunJobState
from core.sample_data import shout_chats
from core.spec import JobSpec, LoraSettings, TrainingSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from workers.tiny_base import build_tiny_base

console = Console(width=150)
POLL_SECONDS = 0.5
# Steady state starts after these steps of each run (first allocations, the first events and
# Adam's state), on both sides alike: a 16-step run's mean is otherwise a warm-up figure.
WARMUP_STEPS = 4
WORDS = ["apple", "river", "stone", "cloud", "green", "light", "paper", "music"]


@dataclass
class RunResult:
    wall_s: float  # launch → every job ended (what a user waits)
    first_step_s: float  # launch → first training step reported
    step_s: float  # sum of the run's step times after its warm-up steps
    step_tokens: int  # tokens trained in those steps
    all_steps_s: float  # the sum over every step, warm-up included
    tokens: int
    peak_rss: int  # largest peak RSS of any rank
    phases: dict[str, float]  # mean seconds per step, by phase


def dataset() -> bytes:
    return "\n".join(json.dumps(r) for r in shout_chats(WORDS, partners=4)).encode()


def run(spec: HostSpec, jobs: list[JobSpec]) -> RunResult:
    """Starts a host of `spec`, admits `jobs` together (they go live at the same step) and
    waits for all of them to end; the host is ended and its CPUs freed before returning."""
    hosts = RayHosts()
    started = time.time()
    hosts.start_host(spec)
    for job in jobs:
        assert hosts.admit(spec.host_id, AdmissionRequest(job)).admitted
    events: dict[str, list[dict[str, Any]]] = {j.job_id: [] for j in jobs}
    while True:
        report = hosts.poll(spec.host_id, {j: len(seen) for j, seen in events.items()})
        if report is None:
            raise SystemExit(f"host {spec.host_id} disappeared")
        for job_id, polled in report["jobs"].items():
            events[job_id].extend(dict(e) for e in polled["events"])
        states = {j: p["state"] for j, p in report["jobs"].items()}
        if all(s != RunJobState.RUNNING for s in states.values()):
            break
        # Seldom: the workers share these CPUs, and a poll costs them more at larger K.
        # Times come from the events' own stamps, not from when a poll saw them.
        time.sleep(POLL_SECONDS)
    wall = max((e.get("data") or {}).get("time", 0.0) for evs in events.values() for e in evs)
    wall -= started
    hosts.kill(spec.host_id)
    # As the scheduler does: a killed host's placement group is released (Ray keeps it
    # reserved otherwise, and the next host would wait for its CPUs).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hosts.reap()
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            break
        time.sleep(POLL_SECONDS)
    if any(s != RunJobState.SUCCEEDED for s in states.values()):
        raise SystemExit(f"host {spec.host_id} failed: {states} {events}")
    metrics = {j: [e["data"] for e in evs if e["type"] == "metrics"] for j, evs in events.items()}
    # Every job of the pack reports the same pack steps; count them once (from the longest).
    longest = max(metrics.values(), key=len)
    steady = longest[WARMUP_STEPS:]
    if not steady:
        raise SystemExit(f"{spec.host_id} has no step after {WARMUP_STEPS} warm-up steps")
    first_step = min(m[0]["time"] for m in metrics.values() if m) - started
    published = [e["data"] for evs in events.values() for e in evs if e["type"] == "published"]
    return RunResult(
        wall_s=wall,
        first_step_s=first_step,
        step_s=sum(m["step_seconds"] for m in steady),
        all_steps_s=sum(m["step_seconds"] for m in longest),
        step_tokens=sum(
            ms[-1]["trained_tokens"] - ms[WARMUP_STEPS - 1]["trained_tokens"]
            for ms in metrics.values()
            if len(ms) > WARMUP_STEPS
        ),
        tokens=sum(ms[-1]["trained_tokens"] for ms in metrics.values()),
        peak_rss=max(p["peak_rss_bytes"] for d in published for p in d["partitioning"]),
        phases={
            phase: statistics.mean(m["phase_seconds"][phase] for m in steady)
            for phase in steady[0]["phase_seconds"]
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    folder = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    base = build_tiny_base(folder / "base")
    store = ObjectStoreConfig(url=str(folder / "objects"))
    open_object_store(store).put_bytes("files/bench/data.jsonl", dataset())
    ray.init(
        address="local",
        num_cpus=args.workers,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
    )

    def jobs(name: str, seeds: list[int]) -> list[JobSpec]:
        return [
            JobSpec(
                job_id=f"{name}-job{seed}",
                tenant="bench",
                attempt=1,
                base_model="tiny-llama",
                base_model_uri=str(base),
                training_file_key="files/bench/data.jsonl",
                lora=LoraSettings(r=8, alpha=16),
                training=TrainingSettings(
                    n_epochs=args.epochs,
                    batch_size=4,
                    max_seq_len=64,
                    learning_rate=1e-3,
                    seed=seed,
                ),
            )
            for seed in seeds
        ]

    def host(name: str, slots: int) -> HostSpec:
        return HostSpec(
            host_id=name,
            shape=HostShape("tiny-llama", str(base), args.workers, False, "fp32"),
            object_store=store,
            model_cache_dir=folder / "cache",
            storage_path=folder / "ray",
            max_slots=slots,
            exclusive=slots == 1,
            zero3_param_persistence_threshold=0,
        )

    console.print("warm-up host (first DeepSpeed use compiles its ops)…")
    run(host("warmup", 1), jobs("warmup", [0]))
    console.print(f"sequential: {max(ks)} jobs, each alone on a host, one after another…")
    sequential = [run(host(f"seq{i}", 1), jobs(f"seq{i}", [i])) for i in range(max(ks))]
    packed = {}
    for k in ks:
        console.print(f"packed: K={k} together on one host…")
        packed[k] = run(host(f"pack{k}", k), jobs(f"pack{k}", list(range(k))))

    table = Table(
        "K",
        "seq e2e tok/s",
        "pack e2e tok/s",
        "speedup",
        "seq step tok/s",
        "pack step tok/s",
        "step_speedup",
        "incl. warm-up",
        "pack wall s",
        "pack start-up s",
        "peak RSS/rank MiB",
        title=f"packing, tiny Llama, {args.workers} Ray workers, ZeRO-3, fp32, CPU",
    )
    ratios = {}
    for k in ks:
        seq_runs = sequential[:k]
        seq_e2e = sum(r.tokens for r in seq_runs) / sum(r.wall_s for r in seq_runs)
        seq_step = sum(r.step_tokens for r in seq_runs) / sum(r.step_s for r in seq_runs)
        pack = packed[k]
        pack_e2e = pack.tokens / pack.wall_s
        pack_step = pack.step_tokens / pack.step_s
        # The same ratio over every step, warm-up included (shown, not the target's figure).
        seq_all = sum(r.tokens for r in seq_runs) / sum(r.all_steps_s for r in seq_runs)
        with_warmup = (pack.tokens / pack.all_steps_s) / seq_all
        ratios[k] = (
            pack_e2e / seq_e2e,
            pack_step / seq_step,
            pack.peak_rss / packed[ks[0]].peak_rss,
        )
        table.add_row(
            str(k),
            f"{seq_e2e:.0f}",
            f"{pack_e2e:.0f}",
            f"{ratios[k][0]:.2f}",
            f"{seq_step:.0f}",
            f"{pack_step:.0f}",
            f"{ratios[k][1]:.2f}",
            f"{with_warmup:.2f}",
            f"{pack.wall_s:.1f}",
            f"{pack.first_step_s:.1f}",
            f"{pack.peak_rss / 2**20:.0f}",
        )
    console.print(table)
    one = sequential[0]
    console.print(
        f"where the time goes, one job alone: {one.wall_s:.1f} s wall = "
        f"{one.first_step_s:.1f} s to the first step (worker start, imports, model load, "
        f"DeepSpeed init) + the steps + teardown; its steps after warm-up took {one.step_s:.1f} s"
    )
    for k in ks:
        phases = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in packed[k].phases.items())
        console.print(f"one step at K={k}: {phases}")
    ray.shutdown()
    if 4 in ratios:
        speedup, step_speedup, rss_ratio = ratios[4]
        print(
            f"K=4 speedup={speedup:.2f} step_speedup={step_speedup:.2f} rss_ratio={rss_ratio:.2f}"
        )


if __name__ == "__main__":
    main()
