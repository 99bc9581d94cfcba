"""Arrivals benchmark: short jobs of mixed sizes arriving as a Poisson stream, trained three
ways side by side in one run, on the same local Ray cluster (2 workers per host, ZeRO-3, the
tiny Llama), every way on pack hosts (the one training path):

  hosts       warm pack hosts: one host is up and has loaded the base before the stream
              starts (as `LORAFLEET_WARM_HOSTS=1` keeps one), and jobs join it at a step
              boundary
  hosts-cold  the same, but the host is started when the first job arrives (every early
              job waits for the base to load)
  alone       each job on a host of its own that ends with it, as `training.packing: false`
              trains (what one run per job was before hosts: a base load per job)
  api-embedded / api-split
              the same stream through the API, as a client sees it (bench/arrivals_api.py):
              `serve` alone (SQLite), or an API replica (`serve --no-scheduler`) beside a
              `lorafleet scheduler` on PostgreSQL; one warm host; each job followed on its
              live event stream, timing submit → its first metrics event *received*
              (p50/p99). `--code DIR` runs those processes from another source tree (an
              older commit, for a before/after figure).

The dispatch rules are the scheduler's, reduced to what the comparison needs (no database,
no API): at most `--runs` hosts at once, the same for every mode. Submit → first
training step is read from the step's own event time (wall clock, stamped on rank 0 when the
step ended, as the API shows it); submit → published is when the driver's poll (every 0.1 s)
sees the job end. Each way also prints where a join's time goes (p50): submit →
admitted → live (its slot added at a step boundary) → first step.

    .venv/bin/python bench/arrivals.py [--jobs 24] [--gap 2] [--seed 0] [--modes …]

Last line: `arrivals jobs=N first_step_p50=<s, hosts> makespan_speedup=<alone/hosts>
p95_speedup=<alone/hosts, submit→succeeded> cold_p95_ratio=<hosts-cold/hosts>`, then per
API mode run, `api_first_event[MODE] p50=<s> p99=<s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import arrivals_api  # beside this file (bench/ is no package)
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
WORDS = ["apple", "river", "stone", "cloud", "green", "light", "paper", "music"]
EPOCHS = (1, 2, 4)  # mixed sizes: 4, 8 or 16 steps of 4 examples


@dataclass
class Timing:
    submitted: float  # wall clock (time.time()), as event times are
    first_step: float | None = None
    done: float | None = None
    admitted: float | None = None  # the host's admission, its slot going live
    live: float | None = None
    load_seconds: float | None = None  # the join's data load on rank 0
    steps_waited: int | None = None  # host steps from its announcement to going live


@dataclass
class ModeResult:
    timings: dict[str, Timing] = field(default_factory=dict)
    worker_groups: int = 0

    def figures(self) -> dict[str, float]:
        first = [t.first_step - t.submitted for t in self.timings.values() if t.first_step]
        done = [t.done - t.submitted for t in self.timings.values() if t.done]
        start = min(t.submitted for t in self.timings.values())
        end = max(t.done or 0.0 for t in self.timings.values())
        return {
            "makespan": end - start,
            "first_p50": percentile(first, 50),
            "first_p95": percentile(first, 95),
            "done_p50": percentile(done, 50),
            "done_p95": percentile(done, 95),
            "groups": float(self.worker_groups),
        }

    def join_phases(self) -> dict[str, float]:
        """p50 seconds of submit→admitted, admitted→live, live→first step."""
        done = [t for t in self.timings.values() if t.admitted and t.live and t.first_step]
        return {
            "admit": percentile([t.admitted - t.submitted for t in done], 50),  # type: ignore[operator]
            "load": percentile([t.live - t.admitted for t in done], 50),  # type: ignore[operator]
            "step": percentile([t.first_step - t.live for t in done], 50),  # type: ignore[operator]
            "load_seconds": percentile([t.load_seconds or 0.0 for t in done], 50),
            "steps_waited": percentile([float(t.steps_waited or 0) for t in done], 50),
        }


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def dataset() -> bytes:
    return "\n".join(json.dumps(r) for r in shout_chats(WORDS, partners=2)).encode()


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.base = build_tiny_base(folder / "base")
        self.store = ObjectStoreConfig(url=str(folder / "objects"))
        open_object_store(self.store).put_bytes("files/bench/data.jsonl", dataset())
        rng = random.Random(args.seed)
        self.arrivals: list[tuple[float, int]] = []  # (offset s, epochs)
        offset = 0.0
        for _ in range(args.jobs):
            self.arrivals.append((offset, rng.choice(EPOCHS)))
            offset += rng.expovariate(1 / args.gap)

    def job(self, mode: str, index: int, epochs: int) -> JobSpec:
        return JobSpec(
            job_id=f"{mode}-{index:02d}",
            tenant="bench",
            attempt=1,
            base_model="tiny-llama",
            base_model_uri=str(self.base),
            training_file_key="files/bench/data.jsonl",
            lora=LoraSettings(r=8, alpha=16),
            training=TrainingSettings(
                n_epochs=epochs, batch_size=4, max_seq_len=64, learning_rate=1e-3, seed=index
            ),
        )

    # ---- the driver loop shared by every mode ------------------------------------------
    def drive(self, mode: str) -> ModeResult:
        result = ModeResult()
        queue: list[JobSpec] = []
        runs: dict[str, Any] = {}  # host id -> host id
        cursors: dict[str, int] = {}
        where: dict[str, str] = {}  # job id -> host id
        hosts = RayHosts()
        if mode == "hosts":  # warm: up, with its base loaded, before the first arrival
            host_id = self.start_host(hosts)
            runs[host_id] = host_id
            while not (report := hosts.poll(host_id, {}) or {}).get("worker_pids"):
                if report and not report["alive"]:
                    raise RuntimeError(f"the warm host ended before the stream: {report}")
                time.sleep(0.2)
        start = time.monotonic()
        pending = list(enumerate(self.arrivals))
        while pending or queue or any(t.done is None for t in result.timings.values()):
            now = time.monotonic()
            while pending and pending[0][1][0] <= now - start:
                index, (_, epochs) = pending.pop(0)
                job = self.job(mode, index, epochs)
                queue.append(job)
                result.timings[job.job_id] = Timing(submitted=time.time())
            if mode == "alone":
                while queue and len(runs) < self.args.runs:
                    job = queue.pop(0)
                    host_id = self.start_host(hosts, exclusive=True)
                    assert hosts.admit(host_id, AdmissionRequest(job)).admitted
                    runs[host_id] = host_id
                    where[job.job_id] = host_id
            else:
                if queue and not runs:
                    host_id = self.start_host(hosts)
                    runs[host_id] = host_id
                for host_id in list(runs):
                    while queue and hosts.admit(host_id, AdmissionRequest(queue[0])).admitted:
                        where[queue.pop(0).job_id] = host_id
            self.observe(mode, runs, where, cursors, result, hosts)
            time.sleep(0.1)
        for host_id in runs:
            report = hosts.poll(host_id, {})
            result.worker_groups += report["worker_starts"] if report else 1
            hosts.kill(host_id)
        release_cpus(hosts)
        return result

    def start_host(self, hosts: RayHosts, *, exclusive: bool = False) -> str:
        host_id = f"bench-{time.time_ns()}"
        hosts.start_host(self.host_spec(host_id, exclusive))
        return host_id

    def host_spec(self, host_id: str, exclusive: bool = False) -> HostSpec:
        """As the scheduler's (orchestrator.scheduling.placement.host_spec): an exclusive
        host has one slot and ends as soon as its job leaves."""
        return HostSpec(
            host_id=host_id,
            shape=HostShape("tiny-llama", str(self.base), 2, False, "fp32"),
            object_store=self.store,
            model_cache_dir=self.folder / "cache",
            storage_path=self.folder / "ray",
            max_slots=1 if exclusive else 8,
            idle_seconds=0.0 if exclusive else 60,
            exclusive=exclusive,
            zero3_param_persistence_threshold=0,
        )

    def observe(
        self,
        mode: str,
        runs: dict[str, Any],
        where: dict[str, str],
        cursors: dict[str, int],
        result: ModeResult,
        hosts: RayHosts,
    ) -> None:
        now = time.time()

        def seen(job_id: str, events: list[Any], state: Any) -> None:
            timing = result.timings[job_id]
            for event in events:
                at = (event["data"] or {}).get("time", now)
                if event["type"] == "metrics" and timing.first_step is None:
                    timing.first_step = at
                elif event["message"].startswith("Admitted") and timing.admitted is None:
                    timing.admitted = at
                elif event["message"].startswith("Training started") and timing.live is None:
                    timing.live = at
                    data = event["data"] or {}
                    timing.load_seconds = data.get("load_seconds")
                    if "announced_at_host_step" in data:
                        timing.steps_waited = data["host_step"] - data["announced_at_host_step"]
            if timing.done is None and state != RunJobState.RUNNING:
                timing.done = now
                if state != RunJobState.SUCCEEDED:
                    console.print(f"[red]{job_id} ended {state}")

        for host_id in list(runs):
            mine = {j: c for j, c in cursors.items() if where.get(j) == host_id}
            report = hosts.poll(host_id, mine)
            unfinished = [
                j for j, h in where.items() if h == host_id and not result.timings[j].done
            ]
            if report is None or (not report["alive"] and unfinished):
                raise RuntimeError(f"host {host_id} ended with jobs on it: {report}")
            for job_id, job in report["jobs"].items():
                cursors[job_id] = job["cursor"]
                seen(job_id, job["events"], job["state"])
            if mode == "alone" and not report["alive"]:  # its job left: it ended, as its
                result.worker_groups += report["worker_starts"]  # spec says
                del runs[host_id]
                hosts.reap()


def release_cpus(hosts: RayHosts) -> None:
    """As the scheduler does: a killed host's placement group is released (Ray keeps it
    reserved otherwise, and the next mode's hosts would wait for its CPUs)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hosts.reap()
        if ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]:
            break
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--gap", type=float, default=2.0, help="mean seconds between arrivals")
    parser.add_argument("--runs", type=int, default=2, help="hosts at once")
    parser.add_argument("--modes", default="hosts,hosts-cold,alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--code", type=Path, default=arrivals_api.ROOT, help="API modes' tree")
    args = parser.parse_args()
    # As the tests do: a local cluster without token auth (it would write a token file into
    # the home folder that later `ray start`s pick up).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    bench = Bench(args, Path(tempfile.mkdtemp(prefix="lorafleet-arrivals-")))
    ray.init(
        address="local",
        num_cpus=2 * args.runs,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
    )
    console.print("warm-up host (first DeepSpeed use compiles its ops)…")
    hosts = RayHosts()
    warm = bench.start_host(hosts, exclusive=True)
    assert hosts.admit(warm, AdmissionRequest(bench.job("warmup", 0, 1))).admitted
    while (report := hosts.poll(warm, {})) is not None and report["alive"]:
        time.sleep(0.5)
    hosts.kill(warm)
    release_cpus(hosts)

    figures = {}
    api_modes = {}
    for mode in args.modes.split(","):
        if mode.startswith("api-"):
            console.print(f"{mode}: {args.jobs} jobs through the API, mean gap {args.gap} s…")
            seen = arrivals_api.run(
                mode,
                bench.folder / mode,
                bench.base,
                dataset(),
                bench.arrivals,
                ray.get_runtime_context().gcs_address,
                args.code,
            )
            api_modes[mode] = arrivals_api.figures(seen, percentile)
            release_cpus(RayHosts())
            continue
        console.print(f"{mode}: {args.jobs} jobs, mean gap {args.gap} s…")
        result = bench.drive(mode)
        figures[mode] = result.figures()
        phases = result.join_phases()
        console.print(
            f"{mode} join p50: submit→admitted {phases['admit']:.2f} s, "
            f"admitted→live {phases['load']:.2f} s (loading {phases['load_seconds']:.2f} s, "
            f"{phases['steps_waited']:.0f} host steps), live→first step {phases['step']:.2f} s"
        )
    table = Table("mode", "makespan s", "first step p50/p95 s", "done p50/p95 s", "worker groups")
    for mode, f in figures.items():
        table.add_row(
            mode,
            f"{f['makespan']:.1f}",
            f"{f['first_p50']:.2f} / {f['first_p95']:.2f}",
            f"{f['done_p50']:.1f} / {f['done_p95']:.1f}",
            f"{f['groups']:.0f}",
        )
    if figures:
        console.print(table)
    api_table = Table(
        "mode", "first step p50 s", "first event via API p50 / p99 s", "done p50/p95 s", "failed"
    )
    for mode, f in api_modes.items():
        api_table.add_row(
            mode,
            f"{f['first_step_p50']:.2f}",
            f"{f['first_seen_p50']:.2f} / {f['first_seen_p99']:.2f}",
            f"{f['done_p50']:.1f} / {f['done_p95']:.1f}",
            str(f["failed"]),
        )
    if api_modes:
        console.print(api_table)
    warm_hosts, alone = figures.get("hosts"), figures.get("alone")
    cold = figures.get("hosts-cold")

    def ratio(slow: dict[str, float] | None, key: str) -> float:
        return slow[key] / warm_hosts[key] if slow and warm_hosts else float("nan")

    first = warm_hosts["first_p50"] if warm_hosts else float("nan")
    print(
        f"arrivals jobs={args.jobs} first_step_p50={first:.2f} "
        f"makespan_speedup={ratio(alone, 'makespan'):.2f} "
        f"p95_speedup={ratio(alone, 'done_p95'):.2f} "
        f"cold_p95_ratio={ratio(cold, 'done_p95'):.2f}"
    )
    for mode, f in api_modes.items():
        print(
            f"api_first_event[{mode}] p50={f['first_seen_p50']:.2f} p99={f['first_seen_p99']:.2f}"
        )


if __name__ == "__main__":
    main()
