"""What a failed `fit()` says about why: the user's exception behind Ray's wrappers, and a code."""

from __future__ import annotations

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
