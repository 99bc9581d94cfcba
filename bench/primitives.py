"""Training-primitives benchmark (issue 21): N clients of the official `tinker` SDK doing SFT
steps (`forward_backward` with cross_entropy, then `optim_step`) against one real
`lorafleet serve`, all N models on one shared warm pack host vs each on a warm host of its
own, the tiny Llama, this machine.

One server serves both sides: its catalog names the tiny base N_max times
(`tiny-llama-0` …), and `LORAFLEET_WARM_HOSTS=1` keeps one warm host per name, so a client
of `tiny-llama-i` trains on host i. Shared: the N clients all use `tiny-llama-0`; separate:
client i uses `tiny-llama-i`. Both sides run with the same idle hosts up. Each client is a
thread with its own `ServiceClient` (as N users are), creates its model, takes one warm-up
step (Adam's state, first allocations), then all start together and take `--steps` timed
steps, each a `forward_backward` and an `optim_step` sent back to back and then waited
for, as the SDK's examples do.

    .venv/bin/python bench/primitives.py [--ns 1,4,8] [--steps 5] [--rows 4] [--tokens 64]

Printed per N and side: aggregate steps/s (N·steps over the time from the common start to
the last client's last answer), the mean step latency a client sees, the mean time from a
request row's write to its answer's (the server's part of it), and the CPU a step costs by
part: the training ranks of the hosts the side uses (what a device would do: idle hosts
left out), the server, and the SDK clients. `ranks_cpu_separate_over_shared` is what
sharing one host saves on the ranks' side alone. `call_overhead_ms`
is the mean latency of one forward_backward+optim_step pair of the N=1 shared client minus
the same pair's work run in this process (workers.host.request_slots.RequestSlots on the
same data, fp32, no Ray, no ZeRO-3): what the API, the request rows, the dispatcher, Ray
and waiting for the host's step boundary add to the step itself. Last line:
`primitives clients=8 shared_vs_separate=… call_overhead_ms=…` (aggregate steps/s, shared
over separate, at the largest N).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from api.server_process import ServerProcess
from workers.tiny_base import build_tiny_base

LEARNING_RATE = 1e-3


# Whose CPU a step costs: the training ranks of the hosts a side uses (what a device would
# do; the other, idle hosts are left out), the server (API, rows, dispatcher, scheduler) and
# the SDK clients (this process).
RANKS, SERVER, CLIENTS = "hosts' ranks", "server", "clients"


def cpu_seconds(pid: int) -> float:
    """CPU seconds so far of one process of this bench's own (read from /proc; 0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Processes:
    server: int
    ranks: dict[str, list[int]]  # base name -> the pids of its warm host's ranks

    def cpu(self, bases: list[str]) -> dict[str, float]:
        ranks = {pid for base in set(bases) for pid in self.ranks[base]}
        return {
            RANKS: sum(cpu_seconds(pid) for pid in ranks),
            SERVER: cpu_seconds(self.server),
            CLIENTS: time.process_time(),
        }


def host_ranks(namespace: str, data_dir: Path) -> dict[str, list[int]]:
    """Each base's warm host's rank pids, as the host reports them."""
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    hosts = RayHosts(Settings(ray_namespace=namespace, data_dir=data_dir))
    ranks: dict[str, list[int]] = {}
    for host_id in hosts.list_hosts():
        report = hosts.poll(host_id, {})
        if report is not None and report["alive"]:
            ranks.setdefault(report["shape"].base_model, []).extend(report["worker_pids"])
    return ranks


@dataclass
class Side:
    clients: int
    wall_s: float  # common start → the last client's last answer
    steps: int  # timed steps, all clients
    latencies: list[float]  # each timed step's pair, as its client saw it
    cpu_s: dict[str, float]  # CPU seconds of the timed steps, by part (PARTS, clients)

    def cpu_ms_per_step(self, part: str) -> float:
        return self.cpu_s[part] / self.steps * 1e3

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s


def sft_data(rows: int, tokens: int, offset: int) -> list[dict[str, Any]]:
    """`rows` sequences of `tokens` token ids (the tiny vocabulary is 512), all trained."""
    return [
        {
            "tokens": [(offset + 7 * r + 3 * i) % 500 + 5 for i in range(tokens)],
            "weights": [1.0] * (tokens - 1),
        }
        for r in range(rows)
    ]


def datums(data: list[dict[str, Any]]) -> list[Any]:
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(d["tokens"][:-1]),
            loss_fn_inputs={"target_tokens": d["tokens"][1:], "weights": d["weights"]},
        )
        for d in data
    ]


def client_run(
    url: str,
    key: str,
    base: str,
    data: list[Any],
    steps: int,
    ready: threading.Barrier,
    out: list[float],
) -> None:
    """One user's script: a model, a warm-up step, then `steps` timed SFT steps."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=base, rank=8, seed=0).result()
        adam = types.AdamParams(learning_rate=LEARNING_RATE)

        def step() -> float:
            began = time.perf_counter()
            fb = training.forward_backward(data, "cross_entropy")
            opt = training.optim_step(adam)
            fb.result()
            opt.result()
            return time.perf_counter() - began

        step()  # warm-up: Adam's state, first allocations on its host
        ready.wait()
        out.extend(step() for _ in range(steps))
    except BaseException:
        ready.abort()  # the others do not wait for this client at the start line
        raise
    finally:
        service.close("success").result()


def drive(
    url: str,
    key: str,
    bases: list[str],
    data: list[Any],
    steps: int,
    processes: Processes | None = None,
) -> Side:
    """Len(bases) clients at once, client i on bases[i]; `processes`: whose CPU to count."""
    n = len(bases)
    start: list[float] = []
    cpu_at_start: list[dict[str, float]] = []

    def at_start() -> None:
        cpu_at_start.append(processes.cpu(bases) if processes is not None else {})
        start.append(time.perf_counter())

    ready = threading.Barrier(n + 1, action=at_start)
    outs: list[list[float]] = [[] for _ in bases]
    threads = [
        threading.Thread(
            target=client_run, args=(url, key, base, data, steps, ready, outs[i]), daemon=True
        )
        for i, base in enumerate(bases)
    ]
    for thread in threads:
        thread.start()
    try:
        ready.wait(timeout=900)
    except threading.BrokenBarrierError:
        raise SystemExit("a client failed before the start: see its error above") from None
    for thread in threads:
        thread.join(timeout=900)
    wall = time.perf_counter() - start[0]
    cpu_at_end = processes.cpu(bases) if processes is not None else {}
    latencies = [t for out in outs for t in out]
    if len(latencies) != n * steps:
        raise SystemExit(f"{n * steps - len(latencies)} steps did not finish: see the server log")
    cpu = {part: cpu_at_end[part] - cpu_at_start[0][part] for part in cpu_at_end}
    return Side(n, wall, n * steps, latencies, cpu)


def rows_in_flight_ms(database: Path, since: float) -> dict[str, float]:
    """Mean ms from a request row's write (the API) to its answer's (the dispatcher), per
    kind, of the rows written since `since`: the server's part of a step; the rest of what
    a client sees is HTTP, the SDK and its futures' long polls."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT kind, finished_at - created_at FROM tinker_requests "
            "WHERE created_at >= ? AND finished_at IS NOT NULL "
            "AND kind IN ('forward_backward', 'optim_step')",
            (since,),
        ).fetchall()
    kinds: dict[str, list[float]] = {}
    for kind, seconds in rows:
        kinds.setdefault(kind, []).append(seconds * 1e3)
    return {kind: statistics.mean(times) for kind, times in sorted(kinds.items())}


def in_process_pair_s(base: Path, data: list[dict[str, Any]], steps: int) -> float:
    """Mean seconds of one forward_backward + optim_step pair run by RequestSlots here."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.host.request_slots import RequestSlots
    from workers.lora.packed_layer import Routing, matching_linear_layers, wrap_linear_layers

    torch.set_num_threads(1)  # as a host's rank runs (one CPU per worker)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.requires_grad_(False)
    model.train()
    routing = Routing()
    layers = wrap_linear_layers(model, matching_linear_layers(model, "all-linear"), routing)
    slots = RequestSlots(model, layers, routing, torch.device("cpu"), pad_token_id=0, rank=0)
    plain = [
        {"tokens": d["tokens"][:-1], "target_tokens": d["tokens"][1:], "weights": d["weights"]}
        for d in data
    ]
    adam = {
        "learning_rate": LEARNING_RATE,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }

    def request(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {"request_id": kind, "model_id": "m", "kind": kind, "payload": payload}

    def pair() -> float:
        began = time.perf_counter()
        slots.run(
            [
                request("forward_backward", {"loss_fn": "cross_entropy", "data": plain}),
                request("optim_step", {"adam_params": adam}),
            ]
        )
        return time.perf_counter() - began

    slots.run([request("create_model", {"lora": {"rank": 8, "seed": 0}})])
    pair()
    times = [pair() for _ in range(steps)]
    errors = [a["error"] for a in slots.take_answers() if a["error"]]
    assert not errors, errors
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="1,4,8", help="client counts")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per client")
    parser.add_argument("--rows", type=int, default=4, help="sequences per forward_backward")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    most = max(ns)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the tests: no token file
    folder = Path(tempfile.mkdtemp(prefix="lorafleet-primitives-"))
    base = build_tiny_base(folder / "tiny-llama")
    raw = sft_data(args.rows, args.tokens, 0)
    data = datums(raw)

    ray.init(
        address="local",
        num_cpus=2 * most + 2,  # logical: every host gets its worker (they share 2 cores)
        include_dashboard=False,
        namespace="primitives",
        log_to_driver=False,
    )
    bases = [f"tiny-llama-{i}" for i in range(most)]
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(folder / "state"),
        "LORAFLEET_OBJECT_STORE": str(folder / "objects"),
        "LORAFLEET_BASE_MODELS": json.dumps({name: str(base) for name in bases}),
        "LORAFLEET_SHARED_PATHS": json.dumps([str(folder)]),
        "LORAFLEET_WARM_HOSTS": "1",
        "LORAFLEET_MAX_CONCURRENT_RUNS": str(most),
        "LORAFLEET_MAX_SLOTS_PER_HOST": str(most),
        "LORAFLEET_DEFAULT_NUM_WORKERS": "1",
        "LORAFLEET_HOST_IDLE_SECONDS": "3600",
        "LORAFLEET_RAY_NAMESPACE": f"primitives-{os.getpid()}",
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    made = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "bench"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = made.stdout.strip().splitlines()[-1]
    server = ServerProcess(env=env, log=folder / "server.log", api_key=key)
    server.start()
    print(f"server {server.url}, {most} warm hosts starting (log: {server.log})", flush=True)
    try:
        began = time.perf_counter()
        drive(server.url, key, bases, data, 1)  # every host up, its base loaded
        print(f"hosts warm in {time.perf_counter() - began:.0f} s", flush=True)
        assert server.process is not None
        processes = Processes(
            server.process.pid, host_ranks(env["LORAFLEET_RAY_NAMESPACE"], folder / "state")
        )
        results: dict[tuple[int, str], Side] = {}
        for n in ns:
            for side, chosen in (("shared", [bases[0]] * n), ("separate", bases[:n])):
                since = time.time()
                result = drive(server.url, key, chosen, data, args.steps, processes)
                results[n, side] = result
                rows = rows_in_flight_ms(folder / "state" / "lorafleet.db", since)
                print(
                    f"N={n} {side:8s} {result.steps_per_s:6.2f} steps/s aggregate, "
                    f"step latency mean {statistics.mean(result.latencies) * 1e3:6.0f} ms; "
                    "row written -> answered "
                    + ", ".join(f"{kind} {ms:.0f} ms" for kind, ms in rows.items())
                    + "; CPU per step: "
                    + ", ".join(
                        f"{part} {result.cpu_ms_per_step(part):.0f} ms" for part in result.cpu_s
                    ),
                    flush=True,
                )
    finally:
        server.stop()
        ray.shutdown()
    pair = in_process_pair_s(base, raw, args.steps)
    one = statistics.mean(results[min(ns), "shared"].latencies)
    print(f"in-process pair (RequestSlots, no Ray): {pair * 1e3:.0f} ms")
    for n in ns:
        shared, separate = results[n, "shared"], results[n, "separate"]
        ratio = shared.steps_per_s / separate.steps_per_s
        # What sharing saves where a device would do the work: ranks' CPU per step.
        saving = separate.cpu_ms_per_step(RANKS) / shared.cpu_ms_per_step(RANKS)
        print(f"N={n} shared_vs_separate={ratio:.2f} ranks_cpu_separate_over_shared={saving:.2f}")
    ratio = results[most, "shared"].steps_per_s / results[most, "separate"].steps_per_s
    print(
        f"primitives clients={most} shared_vs_separate={ratio:.2f} "
        f"call_overhead_ms={(one - pair) * 1e3:.0f}"
    )


if __name__ == "__main__":
    main()
