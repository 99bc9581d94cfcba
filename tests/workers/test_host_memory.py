"""Memory per membership on a real pack host (Ray Train, 2 workers, DeepSpeed ZeRO-3, fp32):
jobs join one after another; after each join (and each leave) the host reports the peak
live tensor bytes (plus the tokenized rows it holds) of one rank during the second step of
that membership (largest rank) and admission's estimate for the same jobs
(core.memory_estimate, the function admission uses). On the tiny Llama (one of its jobs
adapts only q_proj and v_proj: the activation terms are an upper bound there), and on a Qwen2
base read from s3:// (radosgw), each peak is within ±15% of its estimate."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from core.base_catalog import local_base_shape
from core.host_protocol import AdmissionRequest, HostSpec
from core.memory_estimate import estimate_rank_bytes, host_run_shape, slot_demand
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, LoraSettings, TrainingSettings
from orchestrator.scheduling.ray_hosts import RayHosts
from tests.workers.test_pack_host import Watch, all_ended, free_placement_groups, host_spec

pytestmark = [pytest.mark.slow, pytest.mark.long]
MAX_SEQ_LEN = 64
ROWS = 16  # rows of each job's training file (long_rows)
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


def long_rows(seed: int, n: int = ROWS) -> bytes:
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


def run_memberships(
    spec: HostSpec, store_config: ObjectStoreConfig, jobs: list[JobSpec]
) -> list[dict[str, Any]]:
    """Admits the jobs one after another on a new host of `spec` (each once the previous
    membership was measured), lets all finish, and returns every measured membership."""
    store = open_object_store(store_config)
    jobs = [replace(j, base_model_uri=spec.shape.base_model_uri) for j in jobs]
    for seed, j in enumerate(jobs):
        store.put_bytes(j.training_file_key, long_rows(seed))
    hosts = RayHosts()
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
    return memory_events(watch)


def check_estimates(
    seen: list[dict[str, Any]], spec: HostSpec, base_folder: Path, jobs: list[JobSpec]
) -> list[float]:
    """Admission's own arithmetic (the base read from its files, each job's rows counted)
    gives the host's estimate for every membership; returns measured / estimate of each."""
    run = host_run_shape(
        num_workers=2,
        precision="fp32",
        gradient_checkpointing=False,
        loss_chunk_tokens=spec.loss_chunk_tokens,
        persistence_threshold=0,
    )
    by_id = {j.job_id: j for j in jobs}
    ratios = []
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
                dataset_rows=ROWS,
            )
            for m in members
        ]
        estimate = estimate_rank_bytes(local_base_shape(base_folder), run, demands).total
        peak = figures["measured_peak_bytes"]
        ratios.append(peak / estimate)
        print(
            f"memory per rank {'+'.join(members)} at host step {figures['host_step']}: "
            f"estimate {estimate} B, measured {peak} B ({peak / estimate:.3f}), "
            f"{figures['estimate_parts']}"
        )
        assert figures["estimate_bytes"] == estimate
        assert figures["method"] == "live tensor bytes + tokenized rows"
    return ratios


def test_each_membership_peaks_within_15_percent_of_its_estimate(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    spec = host_spec(tiny_base, store_config, tmp_path, checkpoint_every_steps=0)
    seen = run_memberships(spec, store_config, JOBS)
    ratios = check_estimates(seen, spec, tiny_base, JOBS)
    assert all(0.85 <= ratio <= 1.15 for ratio in ratios), seen
    # Three joins, then the leaves (C, then B), each measured: a, ab, abc, ab, a.
    assert [len(m["members"]) for m in seen] == [1, 2, 3, 2, 1], seen


def tiny_qwen2_base(folder: Path) -> Path:
    """A tiny Qwen2 (tied embeddings, biased q/k/v, grouped kv heads) and the tiny tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from workers.tiny_base import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=224,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# All-linear, the second named by dotted paths (counted as the workers match them).
DOTTED = tuple(f"self_attn.{n}_proj" for n in "qkvo") + tuple(
    f"mlp.{n}_proj" for n in ("gate", "up", "down")
)
QWEN2_JOBS = [
    job("qwen-a", 4, LoraSettings(r=8, alpha=16, dropout=0.1), epochs=12),
    job("qwen-b", 8, LoraSettings(r=16, alpha=32, target_modules=DOTTED), epochs=4),
]


def test_a_qwen2_base_on_s3_peaks_within_15_percent_of_its_estimate(
    ray_address: str, radosgw: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """A non-Llama base, read by the host from s3:// (and by admission from its headers
    there): each membership's measured peak is within ±15% of the estimate."""
    folder = tiny_qwen2_base(tmp_path / "qwen2")
    client = radosgw.client()
    for path in folder.iterdir():
        client.upload_file(str(path), s3_bucket, f"bases/qwen2/{path.name}")
    store_config = ObjectStoreConfig(
        url=f"s3://{s3_bucket}/objects",
        endpoint_url=radosgw.endpoint_url,
        access_key_id=radosgw.access_key_id,
        secret_access_key=radosgw.secret_access_key,
    )
    spec = host_spec(folder, store_config, tmp_path, checkpoint_every_steps=0)
    shape = replace(spec.shape, base_model="qwen2", base_model_uri=f"s3://{s3_bucket}/bases/qwen2")
    spec = replace(spec, shape=shape)
    seen = run_memberships(spec, store_config, QWEN2_JOBS)
    ratios = check_estimates(seen, spec, folder, QWEN2_JOBS)
    assert all(0.85 <= ratio <= 1.15 for ratio in ratios), seen
    assert [len(m["members"]) for m in seen] == [1, 2, 1], seen
