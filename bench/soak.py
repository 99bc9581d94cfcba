"""Soak bench: a Poisson stream of jobs over a simulated 3-node Ray cluster on this machine
(bench/soak_cluster.py: a head with no CPUs for the pack hosts, worker nodes for the ranks,
one `serve --no-scheduler` replica and a `lorafleet scheduler` process, SQLite and a local
object-store folder) for `--minutes`, killing something every `--kill-every` seconds, in
turn: the API server, the scheduler, a training worker process (a rank's pid from its host's
report), a worker node (every process of it SIGKILLed, a fresh node added), a host actor
(`ray.kill`). Each kill is by pid of a process the bench started or of its descendant
(bench/soak_kills.py).

Every job is submitted with its own Idempotency-Key and retried with it until acknowledged
(the API may be down). Once the stream ends and every acknowledged job has ended:
- lost: acknowledged jobs that did not succeed, or vanished from the listing;
- twice: jobs with two rows (one idempotency key), two "Adapter published" events, or a step
  recorded twice where no resume explains it (after "Training started ... resumed from step
  N" only steps past N may come again);
- unequal: of 5 jobs (those the kills interrupted first), adapters that differ (> 1e-5) from
  their twins trained afterwards with the same seed and settings, with nothing killed;
- p95_first_step: submit (first try) → the first metrics event's own time, seconds.

    .venv/bin/python bench/soak.py --minutes 20 --kill-every 60
    # on PostgreSQL and S3 (LORAFLEET_S3_ENDPOINT_URL and keys in the environment):
    .venv/bin/python bench/soak.py --database-url postgresql+psycopg://… --object-store s3://b/soak

The last line: `soak jobs=N minutes=M kills=K lost=0 twice=0 unequal=0 p95_first_step=S`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import soak_cluster as sc  # beside this file (bench/ is no package)
from soak_kills import KINDS, Killer

from api.client import TERMINAL, LorafleetClient

TOLERANCE = 1e-5
SAMPLE = 5


@dataclass
class Submission:
    index: int
    key: str  # its Idempotency-Key
    body: dict[str, Any]
    submitted: float  # wall-clock time of the first try
    job_id: str | None = None
    tries: int = 0
    refused: str | None = None


def job_body(
    file_id: str, base: str, seed: int, epochs: int, tag: dict[str, str]
) -> dict[str, Any]:
    return {
        "model": base,
        "training_file": file_id,
        "seed": seed,
        "resources": {"num_workers": 2},
        "training": {"precision": "fp32"},
        "hyperparameters": {"n_epochs": epochs, "batch_size": 4},
        "metadata": tag,
    }


def say(start: float, line: str) -> None:
    print(f"[{time.monotonic() - start:6.0f} s] {line}", flush=True)


class Arrivals(threading.Thread):
    """Submits jobs at Poisson times (`rate` a minute) until stopped; each retried with its
    own Idempotency-Key until the API acknowledges it (or refuses it with a 4xx)."""

    def __init__(
        self, url: str, file_id: str, bases: list[str], rate: float, epochs: int, run: str
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.file_id, self.bases = url, file_id, bases
        self.rate, self.epochs, self.run_id = rate, epochs, run
        self.submissions: list[Submission] = []
        self.stopping = threading.Event()
        self.rng = random.Random(7)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stopping.wait(self.rng.expovariate(self.rate / 60)):
                index = len(self.submissions)
                body = job_body(
                    self.file_id,
                    self.bases[index % len(self.bases)],
                    1000 + index,
                    self.epochs,
                    {"soak": str(index)},
                )
                sub = Submission(index, f"soak-{self.run_id}-{index}", body, time.time())
                self.submissions.append(sub)
                self.submit(http, sub)

    def submit(self, http: httpx.Client, sub: Submission) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            sub.tries += 1
            try:
                response = http.post(
                    "/v1/fine_tuning/jobs", json=sub.body, headers={"Idempotency-Key": sub.key}
                )
            except httpx.TransportError:
                time.sleep(0.5)  # the API is down (killed, restarting): the same key again
                continue
            if response.status_code == 200:
                sub.job_id = response.json()["id"]
                return
            if response.status_code < 500 and response.status_code != 429:
                sub.refused = f"{response.status_code}: {response.text[:200]}"
                return
            time.sleep(0.5)
        sub.refused = "not acknowledged in 300 s"


def all_jobs(api: LorafleetClient) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = api.http.get("/v1/fine_tuning/jobs", params=params).json()
        found.extend(page["data"])
        if not page["has_more"]:
            return found
        after = page["data"][-1]["id"]


def progress(api: LorafleetClient, subs: list[Submission], kills: int) -> tuple[str, int]:
    """A one-line summary, and how many acknowledged jobs are not finished."""
    try:
        status = {j["id"]: j["status"] for j in all_jobs(api)}
    except (httpx.HTTPError, ValueError, KeyError):
        return "(the API is not answering)", len(subs)
    acked = [s.job_id for s in subs if s.job_id]
    counts: dict[str, int] = {}
    for job_id in acked:
        counts[status.get(job_id, "missing")] = counts.get(status.get(job_id, "missing"), 0) + 1
    line = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    unfinished = sum(1 for j in acked if status.get(j) not in TERMINAL)
    return f"submitted {len(subs)}, acknowledged {len(acked)}: {line or 'none'}; kills {kills}", (
        unfinished
    )


@dataclass
class Audit:
    lost: str | None = None
    twice: str | None = None
    first_step: float | None = None
    starts: int = 0  # "Training started" events: more than one, the kills interrupted it


def audit(api: LorafleetClient, sub: Submission, rows: int) -> Audit:
    assert sub.job_id is not None
    found = Audit()
    job = api.get_job(sub.job_id)
    if job["status"] != "succeeded":
        found.lost = f"{job['status']}: {(job.get('error') or {}).get('message')}"
    if rows != 1:
        found.twice = f"{rows} rows for its Idempotency-Key"
    events = api.events(sub.job_id)
    published = sum(e["message"].startswith("Adapter published") for e in events)
    if published > 1:
        found.twice = f"published {published} times"
    resumed = 0
    seen: set[int] = set()
    for event in events:
        data = event.get("data") or {}
        if event["message"].startswith("Training started"):
            found.starts += 1
            resumed, seen = data.get("resumed_from_step") or 0, set()
        elif event["type"] == "metrics":
            step = data["step"]
            if found.first_step is None:
                found.first_step = float(data.get("time", event["created_at"])) - sub.submitted
            if step <= resumed or step in seen:
                found.twice = f"step {step} again after a resume from step {resumed}"
            seen.add(step)
    return found


def adapter(api: LorafleetClient, job_id: str, folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    target = api.download_adapter(job_id, folder / job_id)
    return dict(load_file(str(target / "adapter_model.safetensors")))


def compare_twins(
    api: LorafleetClient, sample: list[Submission], folder: Path, start: float
) -> int:
    """Retrains each sampled job (same seed and settings) with nothing killed; how many of
    the pairs differ by more than TOLERANCE (a twin that did not succeed counts too)."""
    twins = {}
    for sub in sample:
        body = {**sub.body, "metadata": {"soak_twin": str(sub.index)}}
        twins[sub.index] = api.create_job(body)["id"]
    unequal = 0
    for sub in sample:
        assert sub.job_id is not None
        twin = api.wait(twins[sub.index], timeout=900)
        if twin["status"] != "succeeded":
            say(start, f"twin of job {sub.index} ended {twin['status']}: {twin.get('error')}")
            unequal += 1
            continue
        ours, theirs = adapter(api, sub.job_id, folder), adapter(api, twin["id"], folder)
        worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        same_keys = ours.keys() == theirs.keys()
        say(start, f"job {sub.index} ({sub.job_id}) vs its twin: max |difference| = {worst:.2e}")
        unequal += not same_keys or worst > TOLERANCE
    return unequal


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20, help="how long the stream runs")
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between kills")
    parser.add_argument("--rate", type=float, default=3.0, help="jobs a minute (Poisson)")
    # Long enough (240 steps, ~25 s) that a kill finds jobs training: a warm host steps in
    # ~0.1 s here.
    parser.add_argument("--epochs", type=int, default=40, help="epochs a job (6 steps each)")
    parser.add_argument("--nodes", type=int, default=3, help="worker nodes")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs per worker node")
    parser.add_argument("--settle-minutes", type=float, default=15, help="wait for the last")
    # The production pair instead of the embedded defaults (SQLite, a local folder): the
    # caller's LORAFLEET_S3_* variables (endpoint, keys) reach every process it starts.
    parser.add_argument("--database-url", help="e.g. postgresql+psycopg://… (default: SQLite)")
    parser.add_argument("--object-store", help="e.g. s3://bucket/prefix (default: a folder)")
    args = parser.parse_args()

    from workers.tiny_base import build_tiny_base

    start = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="lorafleet-soak-"))
    namespace = f"lorafleet-soak-{os.getpid()}"
    bases = {
        "tiny-a": build_tiny_base(folder / "bases" / "tiny-a"),
        "tiny-b": build_tiny_base(folder / "bases" / "tiny-b", hidden_size=32, seed=1),
    }
    cluster = sc.start_cluster(args.nodes, args.cpus, namespace)
    env = sc.fleet_env(folder, cluster.address, bases, namespace)
    if args.database_url:
        env["LORAFLEET_DATABASE_URL"] = args.database_url
    if args.object_store:
        env["LORAFLEET_OBJECT_STORE"] = args.object_store
        env.update({k: v for k, v in os.environ.items() if k.startswith("LORAFLEET_S3_")})
    fleet = sc.Fleet(env, folder)
    say(start, f"cluster of {args.nodes} worker nodes up; logs and state in {folder}")
    try:
        fleet.start()
        api = LorafleetClient(fleet.api.url, timeout=60)
        file_id = api.upload_records("add.jsonl", sc.DATA)["id"]
        # One job per base first, not counted: the warm hosts up and their bases loaded, so
        # first-step times are the fleet's steady state rather than its own start.
        warmups = [
            api.create_job(job_body(file_id, base, 1, 1, {"soak_warmup": base}))["id"]
            for base in sorted(bases)
        ]
        for job_id in warmups:
            warm = api.wait(job_id, timeout=600)
            if warm["status"] != "succeeded":
                raise RuntimeError(f"warm-up job {job_id} ended {warm['status']}: see {folder}")
        say(start, "warm hosts up; the stream starts")
        arrivals = Arrivals(
            fleet.api.url, file_id, sorted(bases), args.rate, args.epochs, namespace
        )
        killer = Killer(cluster, fleet, namespace, args.cpus)
        began = time.monotonic()
        arrivals.start()
        next_kill, next_report = began + args.kill_every, began
        while time.monotonic() < began + args.minutes * 60:
            now = time.monotonic()
            if now >= next_kill:
                kind = KINDS[len(killer.done) % len(KINDS)]
                # A kind that needs jobs training waits for some, up to the next kill's time
                # (the rotation stays on it when it finds none).
                said = killer.kill(kind, patience=args.kill_every)
                if said is None:
                    say(start, f"no {kind} kill: nothing training for {args.kill_every:g} s")
                else:
                    say(start, f"kill {len(killer.done)}: {kind}: {said}")
                next_kill = time.monotonic() + args.kill_every
            if now >= next_report:
                say(start, progress(api, arrivals.submissions, len(killer.done))[0])
                next_report = now + 15
            time.sleep(0.5)
        arrivals.stopping.set()
        arrivals.join(timeout=330)
        say(start, f"stream over after {args.minutes:g} min; waiting for the last jobs")
        settle_by = time.monotonic() + args.settle_minutes * 60
        while True:
            line, unfinished = progress(api, arrivals.submissions, len(killer.done))
            if unfinished == 0 or time.monotonic() > settle_by:
                break
            say(start, line)
            time.sleep(10)
        say(start, line)

        acked = [s for s in arrivals.submissions if s.job_id]
        for sub in arrivals.submissions:
            if sub.refused:
                say(start, f"job {sub.index} not acknowledged: {sub.refused}")
        rows: dict[str, int] = {}
        listed = all_jobs(api)
        for job in listed:
            index = (job.get("metadata") or {}).get("soak")
            if index is not None:
                rows[index] = rows.get(index, 0) + 1
        audits = {s.index: audit(api, s, rows.get(str(s.index), 0)) for s in acked}
        for sub in acked:
            found = audits[sub.index]
            if rows.get(str(sub.index), 0) == 0:
                found.lost = "vanished from the listing"
            for what in ("lost", "twice"):
                if getattr(found, what):
                    say(start, f"{what}: job {sub.index} ({sub.job_id}): {getattr(found, what)}")
        lost = sum(1 for a in audits.values() if a.lost)
        twice = sum(1 for a in audits.values() if a.twice)
        succeeded = [s for s in acked if not audits[s.index].lost]
        # The sample: jobs the kills interrupted (trained in several goes) first.
        succeeded.sort(key=lambda s: (-audits[s.index].starts, s.index))
        sample = succeeded[:SAMPLE]
        say(start, f"retraining {len(sample)} jobs as twins, nothing killed")
        unequal = compare_twins(api, sample, folder / "adapters", start)
        firsts = [a.first_step for a in audits.values() if a.first_step is not None]
        say(start, "kills: " + ("; ".join(killer.done) or "none"))
    finally:
        fleet.stop()
        sc.end_hosts(namespace)
        import ray

        ray.shutdown()
        cluster.shutdown()
    print(
        f"soak jobs={len(acked)} minutes={args.minutes:g} kills={len(killer.done)} "
        f"lost={lost} twice={twice} unequal={unequal} "
        f"p95_first_step={percentile(firsts, 95):.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
