"""Checks a job's `integrations` at creation: each one's client library must be installed
here, or the job is refused at once rather than failing when its host starts logging."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from core.job_settings import Integration
from orchestrator.errors import InvalidRequest

# Each integration type and the module its host-side logger imports (the `wandb` extra).
LIBRARIES = {"wandb": "wandb"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_integrations(
    integrations: tuple[Integration, ...], installed: Callable[[str], bool] = _installed
) -> None:
    """Raises InvalidRequest (param `integrations`) naming each integration whose library
    this server lacks. The API and the pack hosts run from one installation, so what this
    process can import, the hosts can too."""
    missing = sorted({i.type for i in integrations if not installed(LIBRARIES[i.type])})
    if missing:
        raise InvalidRequest(
            f"integrations: {', '.join(missing)} is not installed on this server (install "
            "lorafleet with the `wandb` extra: pip install 'lorafleet[wandb]')",
            param="integrations",
            code="integration_unavailable",
        )
