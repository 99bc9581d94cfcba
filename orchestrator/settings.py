"""The one settings object: every knob of lorafleet, read from `LORAFLEET_*` environment variables.

With nothing set, everything is embedded: SQLite and a local object-store folder under
`./.lorafleet`, and a Ray cluster started on demand (or `RAY_ADDRESS` when set).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.objectstore import ObjectStoreConfig

# A node group's name, as it goes into a Ray resource name (core.host_protocol.NODE_GROUP_PREFIX).
NODE_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".lorafleet"), description="Where embedded state lives (SQLite, objects)."
    )
    database_url: str = Field(
        default="", description="SQLAlchemy URL; empty means SQLite under data_dir."
    )
    object_store: str = Field(
        default="",
        description="Local folder, or s3://bucket/prefix; empty means data_dir/objects.",
    )
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint as clients reach it, for the presigned URLs the API hands "
        "out (e.g. http://127.0.0.1:9000 when the servers know the store as http://s3:9000); "
        "unset: s3_endpoint_url.",
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to use; unset means RAY_ADDRESS or a local one."
    )
    shared_paths: list[str] = Field(
        default_factory=list,
        description="Absolute folders mounted at the same path on every Ray node (NFS…): on a "
        "cluster, a local object store or base model may live under them (JSON list in env).",
    )
    control_resource: str = Field(
        default="lorafleet-control",
        description="Custom Ray resource marking the nodes pack hosts live on (never lost "
        "with a worker node); no node has it: the head node.",
    )
    ray_namespace: str = Field(
        default="lorafleet", description="Ray namespace of the pack hosts (and of this driver)."
    )
    # Named for runs (a pack host is each of its jobs' run): kept so existing configs hold.
    run_poll_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long a tick waits for pack hosts to answer (every call on a host).",
    )
    max_run_poll_timeouts: int = Field(
        default=3,
        ge=1,
        description="A pack host silent for this many poll timeouts in a row is ended and "
        "its jobs requeue.",
    )
    ray_storage_path: Path | None = Field(
        default=None,
        description="Ray Train's run folder; shared by every node on a cluster. "
        "Default data_dir/ray-runs.",
    )
    base_models: dict[str, str] = Field(
        default_factory=dict,
        description="Base-model catalog: name -> local folder or s3:// URI (JSON in env).",
    )
    base_node_groups: dict[str, str] = Field(
        default_factory=dict,
        description="Base name -> node group its hosts' workers must sit in: the nodes with "
        'the custom Ray resource "lorafleet-group:GROUP" (JSON in env); a base not named '
        "here may use any node.",
    )
    model_cache_dir: Path | None = Field(
        default=None, description="Where s3:// base models are downloaded; default data_dir/models."
    )

    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    max_file_lines: int = Field(default=1_000_000, gt=0, description="Examples per JSONL file.")
    max_active_jobs_per_tenant: int = Field(
        default=100, gt=0, description="Jobs not yet finished, per tenant (429 above it)."
    )
    max_concurrent_runs: int = Field(default=2, ge=1)
    max_storage_bytes_per_tenant: int | None = Field(
        default=None,
        gt=0,
        description="Bytes of uploaded files and merged weights a tenant may keep; at it, a "
        "new merge is refused (429). Unset: no limit.",
    )
    max_concurrent_merges: int = Field(
        default=1, ge=1, description="Merges (merged weights) running at once per scheduler."
    )
    tenant_max_priority: dict[str, int] = Field(
        default_factory=dict,
        description='Highest `priority` each tenant may ask for (JSON in env; "*": every '
        "tenant not named). Unset: 0. Above it a job is refused (400).",
    )
    reserve_after_seconds: float = Field(
        default=30.0,
        ge=0,
        description="A queued job whose host cannot be placed this long reserves what it "
        "waits for: smaller jobs stop overtaking it.",
    )
    precision: Literal["bf16", "fp32"] | None = Field(
        default=None,
        description="A job's training precision when it names none; unset: bf16 on a GPU, "
        "fp32 on CPU.",
    )
    setup_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Per setup phase of a pack host (distributed init, base load, DeepSpeed "
        "init); past it the host's jobs fail with `setup_timeout`.",
    )
    default_num_workers: int = Field(default=2, ge=1)
    # Pack hosts, where every job trains (the protocol: core/host_protocol.py). A
    # `training.packing: false` job gets a host of one slot of its own.
    host_idle_seconds: float = Field(
        default=60.0,
        ge=0,
        description="A pack host with no job for this long (once its base is loaded) ends.",
    )
    warm_hosts: int = Field(
        default=0, ge=0, description="Per base model, hosts kept up with no job (no cold start)."
    )
    step_timeout_seconds: float = Field(
        default=600.0, gt=0, description="A host with jobs but no step for this long is hung."
    )
    max_slots_per_host: int = Field(default=8, ge=1, description="Jobs training on one host.")
    host_memory_bytes: int = Field(
        default=0,
        ge=0,
        description="Memory per rank that admission fills (the memory estimate); 0: from the "
        "cluster (a GPU's memory, or a CPU node's memory over its CPUs, less the reserve).",
    )
    host_memory_reserve_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of each rank's memory (from the cluster) kept back from admission.",
    )
    host_memory_reserve_bytes: int = Field(
        default=512 * 1024**2,
        ge=0,
        description="Bytes per rank kept back beyond that share: what the estimate does not "
        "count (the interpreter and libraries, a CUDA context).",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward (less memory per job)."
    )
    loss_chunk_tokens: int = Field(
        default=4096, ge=1, description="Tokens per chunk of the loss (its fp32 logits)."
    )
    checkpoint_every_steps: int = Field(
        default=50, ge=0, description="Checkpoint each job every N steps (and at epoch ends)."
    )
    checkpoint_keep_last: int = Field(default=3, ge=1)
    publish_retry_seconds: float = Field(
        default=600.0,
        ge=0,
        description="How long a finished job's publish waits for an object store that is "
        "away (retried with backoff; the job stays running) before the job fails.",
    )
    max_worker_restarts: int = Field(
        default=2,
        ge=0,
        description="Worker failures each job on a host survives (resuming from its checkpoint).",
    )
    max_preemptions_per_job: int = Field(
        default=10,
        ge=0,
        description="Preemptions each job survives (Ray's drain with a deadline, a spot "
        "notice): worker restarts and hosts lost with their preempted node, a budget of "
        "their own for the job's life, never its worker restarts or attempts.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Attempts (hosts lost) per job before it fails."
    )
    scheduler_poll_seconds: float = Field(default=0.5, gt=0)
    run_start_grace_seconds: float = Field(
        default=60, ge=0, description="A claimed job may take this long to appear on its host."
    )
    # DeepSpeed keeps parameters smaller than this whole on every rank; 0 partitions all.
    zero3_param_persistence_threshold: int = Field(default=100_000, ge=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0, description="Webhook worker tick.")
    webhook_retry_seconds: float = Field(
        default=5.0, gt=0, description="First retry wait of a failed delivery (then doubling)."
    )
    webhook_max_attempts: int = Field(default=8, ge=1)
    metrics_token: str | None = Field(
        default=None, description="When set, GET /metrics needs `Authorization: Bearer <it>`."
    )
    # The front door against a hostile tenant (webhooks, request rates).
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR, e.g. 10.1.2.0/24) a webhook may reach although they are "
        "private, loopback or link-local: an operator's internal receivers. Empty: none.",
    )
    webhook_deadline_seconds: float = Field(
        default=10.0, gt=0, description="Whole time one delivery may take (connect to body)."
    )
    webhook_max_response_bytes: int = Field(
        default=64 * 1024, ge=0, description="Of a receiver's answer, read at most this much."
    )
    webhook_workers: int = Field(
        default=4, ge=1, description="Deliveries in flight at once (at most one per endpoint)."
    )
    max_webhooks_per_tenant: int = Field(default=10, ge=1, description="Endpoints per tenant.")
    rate_limit_per_second: float = Field(
        default=1000.0, ge=0, description="Requests per second per API key, sustained (0: off)."
    )
    rate_limit_burst: int = Field(
        default=2000, ge=1, description="Requests one API key may send at once above the rate."
    )
    bootstrap_api_key: str | None = Field(
        default=None,
        description="A first API key (a secret of 20+ characters), stored hashed at start "
        "while no key was ever created, so a fresh deployment starts closed.",
    )
    bootstrap_api_key_file: Path | None = Field(
        default=None, description="A file holding bootstrap_api_key (a mounted secret)."
    )
    bootstrap_tenant: str = Field(
        default="default", description="The tenant the bootstrap API key acts for."
    )
    open_mode_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Host names served while no API key exists (open mode): loopback only, "
        "so a web page cannot reach the open API through DNS rebinding.",
    )

    @model_validator(mode="after")
    def _check_node_groups(self) -> Settings:
        """Every problem of `base_node_groups` at once, each naming the setting."""
        problems = [
            f"base {base!r} is not in base_models ({', '.join(sorted(self.base_models)) or 'none'})"
            for base in sorted(self.base_node_groups)
            if base not in self.base_models
        ]
        problems += [
            f"group {group!r} of base {base!r} must be 1-63 letters, digits, '-', '_' or '.'"
            for base, group in sorted(self.base_node_groups.items())
            if not NODE_GROUP_NAME.fullmatch(group)
        ]
        if problems:
            raise ValueError("base_node_groups: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'lorafleet.db'}"
        if not self.object_store:
            self.object_store = str(self.data_dir / "objects")
        if self.ray_storage_path is None:
            self.ray_storage_path = self.data_dir / "ray-runs"
        if self.model_cache_dir is None:
            self.model_cache_dir = self.data_dir / "models"
        return self

    @cached_property
    def object_store_config(self) -> ObjectStoreConfig:
        return ObjectStoreConfig(
            url=self.object_store,
            endpoint_url=self.s3_endpoint_url,
            access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key,
            region=self.s3_region,
            public_endpoint_url=self.s3_public_endpoint_url,
        )
