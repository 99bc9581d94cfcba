"""The object-store key layout: the one place that says where every object lives."""

from __future__ import annotations

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
ARCHIVE = "adapter.tar.gz"  # the folder above plus its manifest, for one-request downloads
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def file_key(tenant: str, file_id: str) -> str:
    return f"files/{tenant}/{file_id}.jsonl"


def adapter_prefix(tenant: str, job_id: str) -> str:
    return f"adapters/{tenant}/{job_id}/"


def adapter_key(tenant: str, job_id: str, name: str) -> str:
    return adapter_prefix(tenant, job_id) + name


def checkpoint_prefix(tenant: str, job_id: str, step: int) -> str:
    return f"runs/{tenant}/{job_id}/checkpoints/step-{step}/"
