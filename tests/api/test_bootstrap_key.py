"""A deployment's first API key comes from a secret (LORAFLEET_BOOTSTRAP_API_KEY or _FILE):
stored hashed while no key was ever created, ignored once one was, and stored once when API
replicas start together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.api_keys import ApiKeys, bootstrap_key_from
from orchestrator.db import make_engine, migrate

KEY = "lf-from-a-secret-0123456789abcdef"


def api_keys(database_url: str) -> ApiKeys:
    engine = make_engine(database_url)
    migrate(engine)
    return ApiKeys(engine)


def test_the_bootstrap_key_is_stored_hashed_and_acts_for_its_tenant(database_url: str) -> None:
    keys = api_keys(database_url)
    row = keys.bootstrap(KEY, "ops")
    assert row is not None and row.tenant == "ops" and KEY not in (row.key_hash, row.key_prefix)
    assert keys.tenant_for(f"Bearer {KEY}") == "ops"
    assert keys.bootstrap(KEY, "ops") is None  # a restart stores nothing more
    assert len(keys.list()) == 1


def test_a_revoked_bootstrap_key_is_not_brought_back_by_a_restart(database_url: str) -> None:
    keys = api_keys(database_url)
    keys.bootstrap(KEY, "ops")
    keys.revoke(KEY)
    assert keys.bootstrap(KEY, "ops") is None
    with pytest.raises(Exception, match="Incorrect API key"):
        keys.tenant_for(f"Bearer {KEY}")


def test_an_existing_key_wins_over_the_secret(database_url: str) -> None:
    keys = api_keys(database_url)
    keys.create("acme")
    assert keys.bootstrap(KEY, "ops") is None
    with pytest.raises(Exception, match="Incorrect API key"):
        keys.tenant_for(f"Bearer {KEY}")


def test_replicas_starting_together_store_the_key_once(database_url: str) -> None:
    replicas = [api_keys(database_url) for _ in range(4)]
    with ThreadPoolExecutor(len(replicas)) as pool:
        stored = list(pool.map(lambda keys: keys.bootstrap(KEY, "ops"), replicas))
    assert sum(row is not None for row in stored) == 1
    assert len(replicas[0].list()) == 1


@pytest.mark.parametrize(
    ("key", "tenant", "field"),
    [
        ("short", "ops", "bootstrap_api_key"),
        (KEY + " x", "ops", "bootstrap_api_key"),
        (KEY, "no spaces", "bootstrap_tenant"),
    ],
)
def test_a_weak_key_or_bad_tenant_is_refused_naming_the_setting(
    tmp_path: Path, key: str, tenant: str, field: str
) -> None:
    keys = api_keys(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(ValueError, match=field):
        keys.bootstrap(key, tenant)
    assert keys.list() == []


def test_the_key_file_is_read_without_its_final_newline(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    assert bootstrap_key_from(None, tmp_path / "key") == KEY
    assert bootstrap_key_from(KEY, None) == KEY
    with pytest.raises(ValueError, match="bootstrap_api_key_file"):
        bootstrap_key_from(None, tmp_path / "missing")
