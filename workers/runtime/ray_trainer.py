"""The Ray Train run that a pack host owns: how its `TorchTrainer` is built, and what a
failed `fit()` says about why (an error, a failure code).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from core.host_protocol import NODE_GROUP_SHARE, node_group_resource

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer


def trainer_for(
    train_loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    num_workers: int,
    use_gpu: bool,
    max_failures: int,
    node_group: str | None = None,
) -> TorchTrainer:
    """One worker per CPU (and GPU), gloo or NCCL; `name` + `storage_path` let a new `fit()`
    resume from the run's last checkpoint, and `max_failures` worker-group restarts (-1: any).
    `node_group`: each worker takes a mark of that group's resource, so it sits only on the
    group's nodes (core.host_protocol.NODE_GROUP_PREFIX)."""
    # Imported here: Ray Train is slow to import, and the scheduler imports the actors' modules.
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    group = {node_group_resource(node_group): NODE_GROUP_SHARE} if node_group else {}
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {}), **group},
        ),
        torch_config=TorchConfig(backend="nccl")
        if use_gpu
        else _gloo_config_on_node_address(TorchConfig),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def _gloo_config_on_node_address(torch_config: Any) -> Any:
    """Ray Train's gloo setup, each rank first told to use the interface of its Ray node's
    address. Gloo otherwise takes whatever the machine's hostname resolves to, and where that
    is no address of this node (a network namespace, a multi-homed host, a container) it
    falls back to 127.0.0.1, which it then gives the other ranks: they cannot connect."""
    from ray.train.torch.config import _TorchBackend

    class GlooOnNodeAddress(_TorchBackend):  # type: ignore[misc]
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(gloo_on_node_address)
            super().on_start(worker_group, backend_config)

    class Config(torch_config):  # type: ignore[misc,valid-type]
        @property
        def backend_cls(self) -> type:
            return GlooOnNodeAddress

    return Config(backend="gloo")


def gloo_on_node_address() -> None:
    """In a rank: GLOO_SOCKET_IFNAME names the interface that holds this Ray node's address
    (an operator's own setting is kept; none is set if no interface holds it)."""
    import os

    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    address = ray.util.get_node_ip_address()
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


@dataclass(frozen=True)
class FitFailure:
    """Why a `fit()` raised, in the terms a job's failure is recorded in."""

    error: str  # "ExceptionType: message" of the user's exception, not Ray's wrapper
    code: str  # "infrastructure" or "training_error"
    traceback: list[str]  # the last lines of the raised exception's traceback

    @classmethod
    def of(cls, exc: BaseException) -> FitFailure:
        cause = root_cause(exc)
        return cls(
            error=f"{type(cause).__name__}: {cause}".strip(),
            code=failure_code(cause, exc),
            traceback=traceback.format_exception(exc)[-5:],
        )


def root_cause(exc: BaseException) -> BaseException:
    """Ray wraps a worker's exception (TrainingFailedError → RayTaskError → …): find the user's."""
    seen = exc
    for _ in range(10):
        inner = getattr(seen, "cause", None) or seen.__cause__
        worker_failures = getattr(seen, "worker_failures", None)
        if worker_failures:
            inner = next(iter(worker_failures.values()))
        if inner is None or inner is seen:
            break
        seen = inner
    return seen


def failure_code(cause: BaseException, exc: BaseException) -> str:
    """`infrastructure` when workers died (beyond the restart budget), else `training_error`.

    Every rank's failure counts: when one worker is killed, the others fail too (a gloo
    "Connection closed by peer"), and any of them may be the one reported first.
    """
    died = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ConnectionError)
    failures = [exc, cause, *(getattr(exc, "worker_failures", None) or {}).values()]
    for failure in failures:
        text = str(failure)
        if (
            isinstance(failure, died)
            or type(failure).__name__ == "WorkerHealthCheckFailedError"
            or isinstance(getattr(failure, "health_check_failure", None), died)
            or "Connection closed by peer" in text
            or "died" in text.lower()
        ):
            return "infrastructure"
    return "training_error"
