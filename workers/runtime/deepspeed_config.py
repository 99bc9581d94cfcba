"""The DeepSpeed config builder: the one place that decides how a run uses DeepSpeed."""

from __future__ import annotations

from typing import Any


def build_deepspeed_config(
    *,
    micro_batch_per_rank: int,
    precision: str,
    param_persistence_threshold: int,
) -> dict[str, Any]:
    """ZeRO-3: the frozen base is partitioned across ranks and gathered layer by layer.

    DeepSpeed gets no optimizer: the LoRA factors are each job's own (own optimizer, own
    clipping). Its gradient clipping is set to 0 explicitly, because its default (1.0 over
    the global norm) would couple the jobs of a pack.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_per_rank,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "stage3_param_persistence_threshold": param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,  # progress goes through our own events
        "wall_clock_breakdown": False,
    }
