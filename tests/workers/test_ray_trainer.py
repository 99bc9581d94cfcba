"""What a failed `fit()` says about why: the user's exception behind Ray's wrappers, and a code."""

from __future__ import annotations

import os

import pytest

from workers.runtime.ray_trainer import FitFailure


def _wrapped(inner: BaseException) -> BaseException:
    # Ray chains the worker's exception as the cause of its own (TrainingFailedError, …).
    outer = RuntimeError("Training failed")
    outer.__cause__ = inner
    return outer


def test_a_training_error_names_the_users_exception_not_rays_wrapper() -> None:
    failure = FitFailure.of(_wrapped(ValueError("prompt past max_seq_len")))

    assert failure.error == "ValueError: prompt past max_seq_len"
    assert failure.code == "training_error"
    assert failure.traceback and "RuntimeError: Training failed" in failure.traceback[-1]


def test_a_lost_connection_between_workers_is_infrastructure() -> None:
    failure = FitFailure.of(_wrapped(RuntimeError("Connection closed by peer [127.0.0.1]:1")))

    assert failure.code == "infrastructure"


def test_gloo_takes_the_interface_of_the_node_address_unless_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    from workers.runtime.ray_trainer import gloo_on_node_address

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    gloo_on_node_address()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the operator's choice is kept
    gloo_on_node_address()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.250")  # nobody's
    gloo_on_node_address()
    assert "GLOO_SOCKET_IFNAME" not in os.environ
