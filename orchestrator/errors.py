"""Domain exceptions: raised by the orchestrator, mapped to HTTP in api/errors.py only."""

from __future__ import annotations


class LorafleetError(Exception):
    """Base of every error the control plane reports to a caller."""


class InvalidRequest(LorafleetError):
    """The caller's input is wrong; `param` names the field (dotted path)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class PayloadTooLarge(InvalidRequest):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param, code="payload_too_large")


class NotFound(LorafleetError):
    def __init__(self, kind: str, object_id: str, param: str | None = None):
        super().__init__(f"No {kind} found with id '{object_id}'.")
        self.kind = kind
        self.object_id = object_id
        self.param = param


class Conflict(LorafleetError):
    """The object exists but is not in a state that allows the request."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidTransition(LorafleetError):
    """A state change the transition table does not allow, or lost to a concurrent one."""

    def __init__(self, job_id: str, target: str, current: str | None):
        super().__init__(f"job {job_id}: cannot move from {current} to {target}")
        self.job_id = job_id
        self.target = target
        self.current = current


class Unauthorized(LorafleetError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RateLimited(LorafleetError):
    """A per-tenant quota is used up; the caller may retry later (after `retry_after`
    seconds, when known)."""

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class Forbidden(LorafleetError):
    """The request may not be served as sent (e.g. a Host that is not this machine's)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class IdempotencyMismatch(LorafleetError):
    """An Idempotency-Key reused with a different request body."""

    def __init__(self, key: str):
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request body")
        self.message = str(self)
