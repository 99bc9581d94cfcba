"""Packing benchmark: K jobs of equal size in one pack vs the same jobs one after another.

Both sides run through the same code path (a RunActor on a local Ray cluster: Ray Train,
2 workers, DeepSpeed ZeRO-3, the tiny Llama), side by side in one run. Printed per K:
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

from core.objectstore import ObjectStoreConfig, open_object_store
from core.sample_data import shout_chats
from core.spec import JobSpec, LoraSettings, RunSpec, TrainingSettings
from workers.run_actor import NAMESPACE, RUNNING, RunActor, run_actor_name
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


def run(spec: RunSpec) -> RunResult:
    actor = RunActor.options(  # type: ignore[attr-defined]
        name=run_actor_name(spec.run_id), namespace=NAMESPACE, lifetime="detached"
    ).remote(spec)
    started = time.time()
    ray.get(actor.start.remote())
    events: dict[str, list[dict[str, Any]]] = {j.job_id: [] for j in spec.jobs}
    while True:
        states = {}
        for job_id, seen in events.items():
            polled = ray.get(actor.poll.remote(job_id, len(seen)))
            seen.extend(polled["events"])
            states[job_id] = polled["state"]
        if all(s != RUNNING for s in states.values()):
            break
        # Seldom: the workers share these CPUs, and a poll per job costs them more at larger K.
        # Times come from the events' own stamps, not from when a poll saw them.
        time.sleep(POLL_SECONDS)
    wall = max((e.get("data") or {}).get("time", 0.0) for evs in events.values() for e in evs)
    wall -= started
    # Only kill the actor once fit() has returned: a killed run keeps its placement group
    # (and CPUs) reserved when Ray runs without its dashboard.
    while not ray.get(actor.finished.remote()):
        time.sleep(POLL_SECONDS)
    ray.kill(actor)
    if any(s != "succeeded" for s in states.values()):
        raise SystemExit(f"run {spec.run_id} failed: {states} {events}")
    metrics = {j: [e["data"] for e in evs if e["type"] == "metrics"] for j, evs in events.items()}
    # Every job of the pack reports the same pack steps; count them once (from the longest).
    longest = max(metrics.values(), key=len)
    steady = longest[WARMUP_STEPS:]
    if not steady:
        raise SystemExit(f"run {spec.run_id} has no step after {WARMUP_STEPS} warm-up steps")
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

    def spec(run_id: str, seeds: list[int]) -> RunSpec:
        jobs = tuple(
            JobSpec(
                job_id=f"{run_id}-job{seed}",
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
        )
        return RunSpec(
            run_id=run_id,
            jobs=jobs,
            num_workers=args.workers,
            use_gpu=False,
            object_store=store,
            model_cache_dir=folder / "cache",
            storage_path=folder / "ray",
            zero3_param_persistence_threshold=0,
        )

    console.print("warm-up run (first DeepSpeed use compiles its ops)…")
    run(spec("warmup", [0]))
    console.print(f"sequential: {max(ks)} single-job runs one after another…")
    sequential = [run(spec(f"seq{i}", [i])) for i in range(max(ks))]
    packed = {}
    for k in ks:
        console.print(f"packed: K={k} in one run…")
        packed[k] = run(spec(f"pack{k}", list(range(k))))

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
