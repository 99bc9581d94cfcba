"""API keys: each belongs to one tenant; stored hashed. Reads here; writes through JobStore."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from orchestrator.errors import Unauthorized
from orchestrator.store import JobStore, new_id, now
from orchestrator.tables import ApiKeyRow

KEY_PREFIX = "lf-"
OPEN_TENANT = "default"  # the one tenant while no key exists (embedded, loopback only)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, engine: Engine) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.store = JobStore(engine)

    def create(self, tenant: str) -> tuple[ApiKeyRow, str]:
        """A new key for `tenant`; the plain key is returned once and never stored."""
        if (
            not tenant
            or len(tenant) > 128
            or not tenant.replace("-", "").replace("_", "").isalnum()
        ):
            raise ValueError("tenant: letters, digits, - and _ only (1-128 characters)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id=new_id("key"),
            tenant=tenant,
            key_hash=_hash(key),
            key_prefix=key[:8],
            created_at=now(),
        )
        return self.store.add_api_key(row), key

    def revoke(self, key_or_id: str) -> ApiKeyRow:
        return self.store.revoke_api_key(key_or_id, _hash(key_or_id))

    def list(self) -> list[ApiKeyRow]:
        with self.sessions() as session:
            return list(session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))

    def any_exist(self) -> bool:
        """Whether the server is closed: once a key was created, even if revoked since (so
        revoking the last key never opens the server to everyone)."""
        with self.sessions() as session:
            return session.scalar(select(ApiKeyRow.id).limit(1)) is not None

    def tenant_for(self, authorization: str | None) -> str:
        """The caller's tenant from `Authorization: Bearer <key>`.

        While no key was ever created the server is open (it then only listens on
        loopback); once one was, every request needs a valid, unrevoked key.
        """
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token:
            with self.sessions() as session:
                tenant = session.scalar(
                    select(ApiKeyRow.tenant).where(
                        ApiKeyRow.key_hash == _hash(token), ApiKeyRow.revoked_at.is_(None)
                    )
                )
            if tenant is not None:
                return tenant
            if self.any_exist():
                raise Unauthorized("Incorrect API key provided.")
            return OPEN_TENANT
        if self.any_exist():
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        return OPEN_TENANT
