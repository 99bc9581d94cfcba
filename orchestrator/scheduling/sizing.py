"""Which host shape a job needs, and whether jobs fit on one host: the memory estimate fed
from the job's settings, its training file's rows, the base's own tensors (config.json and
safetensors headers, local or s3://) and the host settings, against the per-rank budget the
cluster gives (orchestrator.scheduling.memory_budget).

Jobs on a host are counted the way the host itself counts them when it admits
(workers.host.membership): the base's terms once, plus each job's own share (its estimate
alone, less the base's terms). So the scheduler's check and the host's never disagree, and
a host whose budget two schedulers race for refuses the admit that would overfill it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from core.base_catalog import BaseModelCatalog, CatalogError
from core.host_protocol import HostReport, HostShape
from core.job_settings import JobSettings
from core.memory_estimate import (
    BaseShape,
    MemoryEstimate,
    RunShape,
    SlotDemand,
    estimate_rank_bytes,
    host_run_shape,
    slot_demand,
)
from core.tinker_memory import reported_demands
from orchestrator.errors import InvalidRequest
from orchestrator.scheduling.memory_budget import NodeMemory, RankBudgets
from orchestrator.settings import Settings
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)

BASE_TERMS = ("base_shard", "live_parameters")  # what a host holds with no job at all
NODES_FRESH_S = 10.0  # how long the cluster's node list is reused before it is asked again
Nodes = Callable[[], Sequence[NodeMemory]]


class HostSizing:
    def __init__(
        self,
        settings: Settings,
        gpu_available: Callable[[], bool] | None = None,
        *,
        nodes: Nodes = tuple,
        file_rows: Callable[[JobRow], int] = lambda job: 0,
        catalog: BaseModelCatalog | None = None,
    ) -> None:
        self.settings = settings
        self.nodes = nodes
        # None: a GPU if any node the cluster named has one.
        self.gpu_available = gpu_available or (lambda: any(n.gpus for n in self._nodes()))
        self.file_rows = file_rows
        self.catalog = catalog or BaseModelCatalog(
            settings.base_models, settings.object_store_config
        )
        self._cached_nodes: tuple[NodeMemory, ...] = ()
        self._nodes_read_at = float("-inf")
        self._said: set[str] = set()  # warnings already logged (once each)

    # ---- the shape a job needs ----
    def shape_of(self, job: JobRow) -> HostShape:
        settings = self.launched(job)
        return self.shape(
            job.model,
            settings.resources.num_workers,
            settings.resources.use_gpu,
            settings.training.precision,
        )

    def launched(self, job: JobRow) -> JobSettings:
        """The job's settings as its launch resolves them on this cluster (kept once set)."""
        if job.settings.resolved_at_launch:
            return job.settings
        return job.settings.launched(gpu=self.gpu_available())

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
            node_group=self.settings.base_node_groups.get(base),
        )

    def demand_of(self, job: JobRow) -> SlotDemand:
        return demand_of(job, self.file_rows(job))

    # ---- what the cluster gives ----
    def _nodes(self) -> tuple[NodeMemory, ...]:
        now = time.monotonic()
        if now - self._nodes_read_at > NODES_FRESH_S:
            try:
                self._cached_nodes = tuple(self.nodes())
            except Exception as exc:  # noqa: BLE001 - no answer: the budget is unknown, said below
                self._say("nodes", "the cluster's nodes could not be read (%s)", exc)
                self._cached_nodes = ()
            self._nodes_read_at = now
        return self._cached_nodes

    def budgets(self) -> RankBudgets:
        return RankBudgets(self.settings, self._nodes())

    def host_budget(self, shape: HostShape) -> int | None:
        """Per rank, what a host of `shape` may fill; None (logged once): nothing known, so
        admission counts slots only until the cluster names its nodes."""
        budget = self.budgets().host(shape.use_gpu)
        if budget is None:
            self._say(
                f"budget/{shape.use_gpu}",
                "no memory budget for %s hosts: the cluster named no node for them and "
                "LORAFLEET_HOST_MEMORY_BYTES is unset; admission counts slots only",
                "GPU" if shape.use_gpu else "CPU",
            )
        return budget

    # ---- the estimate ----
    def memory_model(self, shape: HostShape) -> tuple[BaseShape, RunShape]:
        # The same settings go into the host's HostSpec, from which the host computes the
        # estimate it reports beside its measured peak (workers.host.memory).
        run = host_run_shape(
            num_workers=shape.num_workers,
            precision=shape.precision,
            gradient_checkpointing=self.settings.gradient_checkpointing,
            loss_chunk_tokens=self.settings.loss_chunk_tokens,
            persistence_threshold=self.settings.zero3_param_persistence_threshold,
            use_gpu=shape.use_gpu,
        )
        return self.catalog.base_shape(shape.base_model), run

    def estimate(self, shape: HostShape, demands: Sequence[SlotDemand]) -> MemoryEstimate:
        """Raises CatalogError when the base's sizes cannot be read."""
        return estimate_rank_bytes(*self.memory_model(shape), demands)

    def estimable(self, shape: HostShape) -> bool:
        """Whether jobs of `shape` can be sized now (always, with no budget to size against).
        A base whose files cannot be read (the store away a moment) keeps its jobs waiting,
        said in the log once, rather than failing them: they were sized when submitted."""
        if self.host_budget(shape) is None:
            return True
        try:
            self.memory_model(shape)
        except CatalogError as exc:
            self._say(f"estimate/{shape.key}", "no memory estimate for %s: %s", shape.key, exc)
            return False
        return True

    def base_bytes(self, shape: HostShape) -> int:
        parts = self.estimate(shape, []).parts
        return sum(parts[k] for k in BASE_TERMS)

    def demand_bytes(self, shape: HostShape, demand: SlotDemand) -> int:
        """What one job adds per rank: its estimate alone, less the base's terms (the sum of
        these over a host's jobs bounds their joint estimate from above)."""
        parts = self.estimate(shape, [demand]).parts
        return sum(v for k, v in parts.items() if k not in BASE_TERMS)

    def fits(self, shape: HostShape, demands: Sequence[SlotDemand]) -> bool:
        """Whether these jobs fit together on one host of `shape`: the base's terms plus each
        job's share within the host's budget. A base whose sizes cannot be read fits nowhere
        (logged; the job then fails with the reason, see `never_fit_reason`)."""
        budget = self.host_budget(shape)
        if budget is None:
            return True
        try:
            need = self.base_bytes(shape) + sum(self.demand_bytes(shape, d) for d in demands)
        except CatalogError as exc:
            self._say(f"estimate/{shape.key}", "no memory estimate for %s: %s", shape.key, exc)
            return False
        return need <= budget

    def room_for_tinker(
        self, report: HostReport, jobs: Sequence[SlotDemand], adding: Sequence[SlotDemand]
    ) -> bool:
        """Whether new Tinker models (`adding`, core.tinker_memory) fit on a host beside its
        jobs and the Tinker models it reports: the rule a job's admission follows (`fits`)."""
        held = reported_demands(report.get("request_models"))
        return self.fits(report["shape"], [*jobs, *held, *adding])

    def never_fit_reason(self, job: JobRow) -> str:
        """Why a job fits on no host of its shape (the scheduler's failure message)."""
        shape, budget = self.shape_of(job), None
        try:
            need = self.estimate(shape, [self.demand_of(job)]).total
            budget = self.host_budget(shape)
        except CatalogError as exc:
            return f"its memory cannot be estimated: {exc.message}"
        return (
            f"the job needs an estimated {need} B of memory per worker, more than a pack "
            f"host has ({budget} B per worker); lower batch_size or max_seq_len"
        )

    def job_memory(self, job: JobRow) -> int:
        """`AdmissionRequest.memory_bytes`: what the job adds per rank (0: no budget, or its
        base cannot be estimated; the host then counts its slot only)."""
        shape = self.shape_of(job)
        try:
            return self.demand_bytes(shape, self.demand_of(job))
        except CatalogError:
            return 0

    def spec_budget(self, shape: HostShape) -> int:
        """`HostSpec.memory_budget_bytes`: the host counts its measured shard and its jobs'
        shares against it, so the gathered parameters are taken off here (0: no check)."""
        budget = self.host_budget(shape)
        if budget is None:
            return 0
        try:
            live = self.estimate(shape, []).parts["live_parameters"]
        except CatalogError:
            return 0
        return max(1, budget - live)

    # ---- at submission ----
    def refuse_if_never_fits(self, job: JobRow) -> None:
        """Raises InvalidRequest when the job alone needs more memory per rank than the
        largest budget any node could give its host: it could never be placed."""
        shape = self.shape_of(job)
        largest = self.budgets().largest(shape.use_gpu)
        if largest is None:
            self.host_budget(shape)  # says (once) that nothing is known
            return
        try:
            estimate = self.estimate(shape, [self.demand_of(job)])
        except CatalogError as exc:
            raise InvalidRequest(
                f"the memory a job on {job.model!r} needs cannot be estimated: {exc.message}",
                param="model",
            ) from exc
        if estimate.total <= largest:
            return
        source = (
            "LORAFLEET_HOST_MEMORY_BYTES"
            if self.settings.host_memory_bytes
            else "the largest node's memory less the reserve"
        )
        raise InvalidRequest(
            f"the job needs an estimated {estimate.total:,} bytes of memory per worker "
            f"({_parts(estimate)}), more than the largest pack host can give: {largest:,} "
            f"bytes per worker ({source}); lower training.max_seq_len or the batch size, "
            "or use more resources.num_workers",
            param="training.max_seq_len",
            code="insufficient_memory",
        )

    def _say(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)


def demand_of(job: JobRow, dataset_rows: int = 0) -> SlotDemand:
    """What a job asks of each rank (core.memory_estimate.slot_demand)."""
    training, lora = job.settings.training, job.settings.lora
    return slot_demand(
        batch_size=training.batch_size * training.rows_per_example,
        num_workers=job.settings.resources.num_workers,
        max_seq_len=training.max_seq_len,
        lora_r=lora.r,
        target_modules=lora.target_modules,
        lora_dropout=lora.dropout,
        dataset_rows=dataset_rows * training.rows_per_example,
    )


def _parts(estimate: MemoryEstimate) -> str:
    return ", ".join(f"{name} {size:,}" for name, size in estimate.parts.items() if size)
