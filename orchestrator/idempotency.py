"""Idempotency-Key: a retried request gets the first response instead of a second object.

The first request with a key inserts a pending record (the primary key makes this a race
exactly one request wins), does the work, and stores its response; a concurrent duplicate
waits for that response. The same key with a different body is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from orchestrator.errors import Conflict, IdempotencyMismatch
from orchestrator.models import IdempotencyRow
from orchestrator.store import now

WAIT_FOR_FIRST_S = 60.0


def request_hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(
            part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        )
        digest.update(b"\0")
    return digest.hexdigest()


class IdempotencyKeys:
    def __init__(self, engine: Engine) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def run(
        self,
        tenant: str,
        endpoint: str,
        key: str,
        body_hash: str,
        produce: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """The stored response for (tenant, endpoint, key), or `produce()`'s, stored."""
        where = (
            IdempotencyRow.tenant == tenant,
            IdempotencyRow.endpoint == endpoint,
            IdempotencyRow.key == key,
        )
        try:
            with self.sessions.begin() as session:
                session.add(
                    IdempotencyRow(
                        tenant=tenant,
                        endpoint=endpoint,
                        key=key,
                        request_hash=body_hash,
                        created_at=now(),
                    )
                )
        except IntegrityError:
            return self._replay(where, key, body_hash)
        try:
            response = produce()
        except BaseException:
            # Nothing was created: free the key so the client's retry can do the work.
            with self.sessions.begin() as session:
                session.execute(delete(IdempotencyRow).where(*where))
            raise
        with self.sessions.begin() as session:
            session.execute(
                update(IdempotencyRow).where(*where).values(status_code=200, response=response)
            )
        return response

    def _replay(self, where: Any, key: str, body_hash: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_FOR_FIRST_S
        while True:
            with self.sessions() as session:
                row = session.scalar(select(IdempotencyRow).where(*where))
            if row is None:  # the first request failed and freed the key: nothing to replay
                raise Conflict(f"the first request with Idempotency-Key {key!r} failed; retry it")
            if row.request_hash != body_hash:
                raise IdempotencyMismatch(key)
            if row.response is not None:
                return row.response
            if time.monotonic() > deadline:
                raise Conflict(f"the first request with Idempotency-Key {key!r} is still running")
            time.sleep(0.05)
