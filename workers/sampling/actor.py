"""The sampler of one base as a Ray actor (issue 21), started by the scheduler's dispatcher
(orchestrator.tinker.sampling) on the first request for its base. It is its own process,
never a pack host: sampling shares no memory or step with training, so it never stalls it.
It holds the base on CPU (num_gpus=0): vLLM with multi-LoRA on a GPU is not wired yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.objectstore import ObjectStoreConfig
from workers.runtime.base_models import resolve_base_model
from workers.sampling.sampler import DEFAULT_MAX_ADAPTERS, Sampler


def sampler_actor_name(base_model: str) -> str:
    return f"lorafleet-sampler-{base_model}"


class SamplerActor:
    def __init__(
        self,
        base_uri: str,
        model_cache_dir: str,
        object_store: ObjectStoreConfig,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ) -> None:
        base = resolve_base_model(base_uri, Path(model_cache_dir), object_store)
        self.sampler = Sampler(base, object_store, max_adapters)

    def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.sampler.sample(request)

    def release(self, prefixes: list[str]) -> int:
        """Drops cached adapters whose sampling sessions ended (Sampler.release)."""
        return self.sampler.release(prefixes)
