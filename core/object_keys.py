"""The object-store key layout: the one place that says where every object lives.

A job's adapters and checkpoints live under its attempt number, so a stale run (an older
attempt still alive after a requeue) writes beside the current attempt, never over it:

    adapters/{tenant}/{job_id}/attempt-{n}/…
    runs/{tenant}/{job_id}/attempt-{n}/checkpoints/step-{s}/…

Merged weights (an adapter merged into its base at one scale) are a cache beside them, per
job, checkpoint ("final" or "step-{s}") and scale, with a manifest written last:

    merged/{tenant}/{job_id}/{checkpoint}/scale-{scale}/…
"""

from __future__ import annotations

import re

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
ARCHIVE = "adapter.tar.gz"  # the folder above plus its manifest, for one-request downloads
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# (attempt, step) of a checkpoint key under checkpoints_root().
CHECKPOINT_KEY = re.compile(r"attempt-(\d+)/checkpoints/step-(\d+)/")


def file_key(tenant: str, file_id: str) -> str:
    return f"files/{tenant}/{file_id}.jsonl"


def adapter_prefix(tenant: str, job_id: str, attempt: int) -> str:
    return f"adapters/{tenant}/{job_id}/attempt-{attempt}/"


def adapter_key(tenant: str, job_id: str, attempt: int, name: str) -> str:
    return adapter_prefix(tenant, job_id, attempt) + name


def checkpoints_root(tenant: str, job_id: str) -> str:
    """Above every attempt's checkpoints of a job."""
    return f"runs/{tenant}/{job_id}/"


def checkpoint_prefix(tenant: str, job_id: str, attempt: int, step: int) -> str:
    return f"{checkpoints_root(tenant, job_id)}attempt-{attempt}/checkpoints/step-{step}/"


def adapters_root(tenant: str, job_id: str) -> str:
    """Above every attempt's published adapter of a job."""
    return f"adapters/{tenant}/{job_id}/"


def merged_root(tenant: str, job_id: str) -> str:
    """Above every merged-weights cache of a job."""
    return f"merged/{tenant}/{job_id}/"


def merged_prefix(tenant: str, job_id: str, checkpoint: str, scale: str) -> str:
    """`scale` as core.merged_files.canonical_scale writes it (one key per value)."""
    return f"{merged_root(tenant, job_id)}{checkpoint}/scale-{scale}/"


def tinker_checkpoint_prefix(tenant: str, model_id: str, checkpoint_id: str) -> str:
    """A Tinker model's saved weights (issue 21): `tinker://{model_id}/{checkpoint_id}`, with
    checkpoint_id `weights/…`, `sampler_weights/…` or `external_weights/…`, lives here (a
    PEFT adapter, the optimizer's state for `weights/`, and `lorafleet.json` written last)."""
    return f"tinker/{tenant}/{model_id}/{checkpoint_id}/"
