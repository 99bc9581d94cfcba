"""Which host shape a job needs, and whether jobs fit on one host: the memory estimate fed
from the job's settings, the base's config.json and the host settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from core.host_protocol import HostShape
from core.memory_estimate import (
    BaseShape,
    RunShape,
    SlotDemand,
    estimate_rank_bytes,
    host_run_shape,
    slot_demand,
)
from orchestrator.settings import Settings
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)

BASE_TERMS = ("base_shard", "live_parameters")  # what a host holds with no job at all


class HostSizing:
    def __init__(self, settings: Settings, gpu_available: Callable[[], bool]) -> None:
        self.settings = settings
        self.gpu_available = gpu_available

    def shape_of(self, job: JobRow) -> HostShape:
        resources = job.settings["resources"]
        precision = job.settings["training"].get("precision")
        return self.shape(job.model, resources["num_workers"], resources["use_gpu"], precision)

    def shape(
        self, base: str, workers: int, use_gpu: bool | None = None, precision: str | None = None
    ) -> HostShape:
        gpu = self.gpu_available() if use_gpu is None else use_gpu
        return HostShape(
            base_model=base,
            base_model_uri=self.settings.base_models[base],
            num_workers=workers,
            use_gpu=gpu,
            precision=precision or self.settings.precision or ("bf16" if gpu else "fp32"),
        )

    def memory_model(self, shape: HostShape) -> tuple[BaseShape, RunShape]:
        # The same settings go into the host's HostSpec, from which the host computes the
        # estimate it reports beside its measured peak (workers.host.memory).
        run = host_run_shape(
            num_workers=shape.num_workers,
            precision=shape.precision,
            gradient_checkpointing=self.settings.gradient_checkpointing,
            loss_chunk_tokens=self.settings.loss_chunk_tokens,
            persistence_threshold=self.settings.zero3_param_persistence_threshold,
        )
        return base_shape(shape.base_model_uri), run

    def fits(self, shape: HostShape, demands: Sequence[SlotDemand]) -> bool:
        """Whether these jobs fit together on one host of `shape` (with no memory budget
        configured, or no readable config for the base, only the slot limit counts)."""
        budget = self.settings.host_memory_bytes
        if not budget:
            return True
        try:
            model = self.memory_model(shape)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("no memory estimate for %s (%s); slot limit only", shape.key, exc)
            return True
        return estimate_rank_bytes(*model, demands).total <= budget

    def job_memory(self, job: JobRow) -> int:
        """What the job adds per rank, beyond the base the host holds anyway (0: unknown)."""
        try:
            model = self.memory_model(self.shape_of(job))
        except (OSError, KeyError, ValueError):
            return 0
        parts = estimate_rank_bytes(*model, [demand_of(job)]).parts
        return sum(v for k, v in parts.items() if k not in BASE_TERMS)


def demand_of(job: JobRow) -> SlotDemand:
    """What a job asks of each rank (core.memory_estimate.slot_demand)."""
    training, lora = job.settings["training"], job.settings["lora"]
    return slot_demand(
        batch_size=training["batch_size"],
        num_workers=job.settings["resources"]["num_workers"],
        max_seq_len=training["max_seq_len"],
        lora_r=lora["r"],
        target_modules=lora["target_modules"],
        lora_dropout=lora.get("dropout", 0.0),
    )


@cache
def base_shape(base_model_uri: str) -> BaseShape:
    """The base's sizes from its config.json, for a base in a local folder (an s3:// base
    raises OSError here: admission then counts slots only)."""
    return BaseShape.from_config(json.loads((Path(base_model_uri) / "config.json").read_text()))
