"""Idempotency-Key: a retried request gets the first response instead of a second object.

The record of a key is written in the same transaction as the object it created, so a
crash leaves either both or neither, and of concurrent duplicates exactly one commits
(the key is the primary key); the others then read its response. The same key with a
different body is refused. JobStore writes the record; this module reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from orchestrator.errors import IdempotencyMismatch
from orchestrator.store import DuplicateIdempotencyKey
from orchestrator.tables import IdempotencyRow

__all__ = ["DuplicateIdempotencyKey", "Idempotency", "IdempotencyKeys", "request_hash"]


def request_hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        encoded = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        digest.update(encoded)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Idempotency:
    """A request's key, and how to render the response to store for its retries."""

    tenant: str
    endpoint: str
    key: str
    request_hash: str
    render: Callable[[Any], dict[str, Any]]


class IdempotencyKeys:
    def __init__(self, engine: Engine) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def create_once(self, request: Idempotency, create: Callable[[], Any]) -> dict[str, Any]:
        """The first response to the key, or `create()`'s (which records the key in the
        object's own transaction), rendered."""
        first = self.replay(request)
        if first is not None:
            return first
        try:
            return request.render(create())
        except DuplicateIdempotencyKey:  # a concurrent duplicate won: answer as it did
            first = self.replay(request)
            assert first is not None
            return first

    def replay(self, request: Idempotency) -> dict[str, Any] | None:
        """The first response to this key, None if the key is new; refuses another body."""
        with self.sessions() as session:
            row = session.scalar(
                select(IdempotencyRow).where(
                    IdempotencyRow.tenant == request.tenant,
                    IdempotencyRow.endpoint == request.endpoint,
                    IdempotencyRow.key == request.key,
                )
            )
        if row is None:
            return None
        if row.request_hash != request.request_hash:
            raise IdempotencyMismatch(request.key)
        return row.response
