"""API keys: each belongs to one tenant; stored hashed. Reads here; writes through JobStore."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from orchestrator.errors import Unauthorized
from orchestrator.store import JobStore, new_id, now
from orchestrator.tables import ApiKeyRow

# The `tinker` SDK refuses keys without this prefix, so every key made here has it: one key
# for the OpenAI-style API and the Tinker API alike. (Keys made before with "lf-" still work
# everywhere but in the tinker SDK.)
KEY_PREFIX = "tml-"
OPEN_TENANT = "default"  # the one tenant while no key exists (embedded, loopback only)
TENANT_RULE = "letters, digits, - and _ only (1-128 characters)"
MIN_BOOTSTRAP_KEY_CHARS = 20


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, engine: Engine) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.store = JobStore(engine)

    def create(self, tenant: str, prefix: str = KEY_PREFIX) -> tuple[ApiKeyRow, str]:
        """A new key for `tenant`; the plain key is returned once and never stored."""
        if not self._valid_tenant(tenant):
            raise ValueError(f"tenant: {TENANT_RULE}")
        key = prefix + secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id=new_id("key"),
            tenant=tenant,
            key_hash=_hash(key),
            key_prefix=key[:8],
            created_at=now(),
        )
        return self.store.add_api_key(row), key

    def bootstrap(self, key: str, tenant: str) -> ApiKeyRow | None:
        """Stores `key` (hashed) for `tenant` if no key was ever created: a deployment's
        first key, from a secret, so a fresh server starts closed. Once any key exists the
        secret is ignored (revoking the bootstrap key never brings it back). None: not
        stored (another key exists, or another replica stored it at the same moment)."""
        if not self._valid_tenant(tenant):
            raise ValueError(f"bootstrap_tenant: {TENANT_RULE}")
        if len(key) < MIN_BOOTSTRAP_KEY_CHARS or key != key.strip() or " " in key:
            raise ValueError(
                f"bootstrap_api_key: at least {MIN_BOOTSTRAP_KEY_CHARS} characters, no spaces "
                "(e.g. `python -c 'import secrets; print(\"tml-\" + secrets.token_urlsafe(32))'`)"
            )
        if self.any_exist():
            return None
        row = ApiKeyRow(
            id=new_id("key"),
            tenant=tenant,
            key_hash=_hash(key),
            key_prefix=key[:8],
            created_at=now(),
        )
        try:
            return self.store.add_api_key(row)
        except IntegrityError:  # another replica stored the same key first
            return None

    @staticmethod
    def _valid_tenant(tenant: str) -> bool:
        return (
            bool(tenant)
            and len(tenant) <= 128
            and tenant.replace("-", "").replace("_", "").isalnum()
        )

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

    def key_id_for(self, authorization: str | None) -> str | None:
        """The id (key-…) of the caller's key, for events that say who did something; None
        in open mode."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token:
            return None
        with self.sessions() as session:
            return session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.key_hash == _hash(token)))

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


def bootstrap_key_from(key: str | None, key_file: Path | None) -> str | None:
    """The bootstrap key from the settings: given directly, or read from a file (a mounted
    secret; surrounding whitespace, such as a final newline, is not part of it)."""
    if key_file is not None:
        try:
            return key_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"bootstrap_api_key_file: cannot read {key_file}: {exc}") from exc
    return key
