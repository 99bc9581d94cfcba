"""Capacity of a GPU node for one base: jobs per host per node, from the memory estimate.

For a base (a built-in profile, or any `config.json` with `--config`), a dtype, a GPU's memory
and a LoRA rank, prints for each host width (GPUs per host) how many jobs one host holds
(admission's own arithmetic: core.memory_estimate, less the scheduler's default reserve), how
many hosts a node holds, and so jobs training at once per node. With `--step-seconds` (a
step time you measured for that shape: bench/gpu_check.py on the GPU) and `--steps` per job,
it adds adapters per day per node. Which figures are computed and which are assumed is said
on each line: nothing here is measured on a GPU.

    .venv/bin/python bench/capacity.py --base llama-3.1-8b --gpu-gib 141 --gpus 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.memory_estimate import BaseShape, RunShape, SlotDemand, estimate_rank_bytes, slot_demand

GIB = 1024**3
# Published config.json widths of common bases (the hub's files; no download needed).
PROFILES = {
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    },
    "qwen2.5-7b": {
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
}
# The scheduler's defaults (orchestrator.settings): what admission keeps back on each rank.
RESERVE_FRACTION = 0.1
RESERVE_BYTES = 512 * 1024**2
MAX_SLOTS_PER_HOST = 8


def jobs_per_host(base: BaseShape, run: RunShape, job: SlotDemand, budget: int) -> int:
    """How many such jobs one host admits within a rank's budget (admission's rule)."""
    count = 0
    while count < MAX_SLOTS_PER_HOST:
        if estimate_rank_bytes(base, run, [job] * (count + 1)).total > budget:
            break
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(PROFILES), default="llama-3.1-8b")
    parser.add_argument("--config", type=Path, help="a base's config.json instead of --base")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--gpu-gib", type=float, default=141.0, help="memory of one GPU (H200)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--step-seconds",
        type=float,
        help="a host step with all its members, as you measured it (the same for every width "
        "here, which it is not: measure each width you consider)",
    )
    parser.add_argument("--steps", type=int, default=1000, help="steps per job")
    args = parser.parse_args()

    config = json.loads(args.config.read_text()) if args.config else PROFILES[args.base]
    base = BaseShape.from_config(config)
    gpu_bytes = int(args.gpu_gib * GIB)
    budget = int(gpu_bytes * (1 - RESERVE_FRACTION)) - RESERVE_BYTES
    name = args.config or args.base
    print(
        f"base={name} parameters={base.parameter_count / 1e9:.2f}B precision={args.precision} "
        f"gpu={args.gpu_gib:g}GiB rank={args.rank} batch={args.batch_size} "
        f"seq_len={args.seq_len} (computed from the memory estimate; not measured)"
    )
    for width in (w for w in (1, 2, 4, 8) if w <= args.gpus):
        run = RunShape(
            world_size=width,
            precision=args.precision,
            gradient_checkpointing=args.gradient_checkpointing,
            logits_chunk_tokens=4096,
            use_gpu=True,
        )
        job = slot_demand(
            batch_size=args.batch_size,
            num_workers=width,
            max_seq_len=args.seq_len,
            lora_r=args.rank,
            target_modules="all-linear",
        )
        per_host = jobs_per_host(base, run, job, budget)
        hosts = args.gpus // width
        one = estimate_rank_bytes(base, run, [job]).total
        line = (
            f"gpus_per_host={width} rank_bytes_one_job={one / GIB:.1f}GiB "
            f"jobs_per_host={per_host} hosts_per_node={hosts} jobs_per_node={per_host * hosts}"
        )
        if args.step_seconds:
            # Packed jobs step together: one host step trains every member once.
            per_day = hosts * per_host * 86_400 / (args.step_seconds * args.steps)
            line += f" adapters_per_day={per_day:.0f} (assumed host step {args.step_seconds}s)"
        print(line)


if __name__ == "__main__":
    main()
