"""Memory per membership on a real pack host (Ray Train, 2 workers, DeepSpeed ZeRO-3, fp32):
jobs join one after another; after each join (and each leave) the host reports the peak
live tensor bytes of one rank during the second step of that membership (largest rank) and
admission's estimate for the same jobs (core.memory_estimate, the function admission uses);
each measured peak is within ±20% of its estimate."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import AdmissionRequest
from core.memory_estimate import estimate_rank_bytes, host_run_shape, slot_demand
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, LoraSettings, TrainingSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from orchestrator.scheduling.sizing import base_shape
from tests.workers.test_pack_host import Watch, all_ended, free_placement_groups, host_spec

pytestmark = [pytest.mark.slow, pytest.mark.long]
MAX_SEQ_LEN = 64
WORDS = [
    "the",
    "river",
    "stone",
    "cloud",
    "apple",
    "green",
    "light",
    "music",
    "paper",
    "ocean",
    "quick",
    "brown",
    "fox",
]


def long_rows(seed: int, n: int = 16) -> bytes:
    """Text rows longer than MAX_SEQ_LEN tokens: every row is cut to it, so the step's width
    is the max_seq_len admission assumes (its estimate is an upper bound otherwise)."""
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(80))} for _ in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode()


def job(job_id: str, batch_size: int, lora: LoraSettings, epochs: int) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        tenant="memory",
        attempt=1,
        base_model="tiny-llama",
        base_model_uri="",
        training_file_key=f"files/memory/{job_id}.jsonl",
        lora=lora,
        training=TrainingSettings(
            batch_size=batch_size, max_seq_len=MAX_SEQ_LEN, n_epochs=epochs, seed=3
        ),
    )


# Three jobs of different sizes: micro-batches, ranks, dropout and targeted layers differ.
JOBS = [
    # a and b train long enough (80 and 40 steps) to still be there when c's pack is measured.
    job("mem-a", 4, LoraSettings(r=8, alpha=16, dropout=0.1), epochs=20),
    job("mem-b", 8, LoraSettings(r=16, alpha=32), epochs=20),
    job("mem-c", 4, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")), epochs=10),
]


def memory_events(watch: Watch) -> list[dict[str, Any]]:
    """Each measured membership's figures (every member gets the same event), by host step."""
    found = {}
    for events in watch.events.values():
        for event in events:
            if event["type"] == "memory":
                found[event["data"]["host_step"]] = event["data"]
    return [found[step] for step in sorted(found)]


def measured(watch: Watch, members: tuple[str, ...]) -> bool:
    return any(tuple(m["members"]) == members for m in memory_events(watch))


def test_each_membership_peaks_within_20_percent_of_its_estimate(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    store = open_object_store(store_config)
    jobs = [replace(j, base_model_uri=str(tiny_base)) for j in JOBS]
    for seed, j in enumerate(jobs):
        store.put_bytes(j.training_file_key, long_rows(seed))
    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path, checkpoint_every_steps=0)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    try:
        for index, j in enumerate(jobs):
            assert hosts.admit(spec.host_id, AdmissionRequest(j)).admitted
            members = tuple(x.job_id for x in jobs[: index + 1])
            watch.until(lambda r, m=members: measured(watch, m))  # type: ignore[misc]
            # The host's poll report carries the latest membership's figures too.
            assert watch.report is not None
            memory, latest = watch.report["memory"], memory_events(watch)[-1]
            assert memory.get("members") == latest["members"] == list(members)
            assert memory.get("estimate_bytes_per_rank") == latest["estimate_bytes"]
            assert memory["peak_bytes_per_rank"] == latest["measured_peak_bytes"]
        report = watch.until(all_ended)
        assert all(j["state"] == "succeeded" for j in report["jobs"].values()), report
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()

    seen = memory_events(watch)
    # Admission's own arithmetic for the same jobs gives the same estimate.
    run = host_run_shape(
        num_workers=2,
        precision="fp32",
        gradient_checkpointing=False,
        loss_chunk_tokens=spec.loss_chunk_tokens,
        persistence_threshold=0,
    )
    by_id = {j.job_id: j for j in jobs}
    for figures in seen:
        members = figures["members"]
        demands = [
            slot_demand(
                batch_size=by_id[m].training.batch_size,
                num_workers=2,
                max_seq_len=MAX_SEQ_LEN,
                lora_r=by_id[m].lora.r,
                target_modules=by_id[m].lora.target_modules,
                lora_dropout=by_id[m].lora.dropout,
            )
            for m in members
        ]
        estimate = estimate_rank_bytes(base_shape(str(tiny_base)), run, demands).total
        peak = figures["measured_peak_bytes"]
        print(
            f"memory per rank {'+'.join(members)} at host step {figures['host_step']}: "
            f"estimate {estimate} B, measured {peak} B ({peak / estimate:.3f}), "
            f"{figures['estimate_parts']}"
        )
        assert figures["estimate_bytes"] == estimate
        assert figures["method"] == "live tensor bytes"
    for figures in seen:
        estimate, peak = figures["estimate_bytes"], figures["measured_peak_bytes"]
        assert 0.8 * estimate <= peak <= 1.2 * estimate, figures
    # Three joins, then the leaves (C, then B), each measured: a, ab, abc, ab, a.
    assert [len(m["members"]) for m in seen] == [1, 2, 3, 2, 1], seen
