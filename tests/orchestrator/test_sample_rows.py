"""Sampling rows (issue 21): they never go to a pack host, they come to the samplers' step
oldest first, and those an earlier scheduler had handed over fail when a new one starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.objectstore import ObjectStoreConfig
from orchestrator.db import make_engine, migrate
from orchestrator.tinker.rows import DONE, FAILED, SAMPLE
from orchestrator.tinker.sampling import SampleDispatch
from orchestrator.tinker.store import TinkerStore


@pytest.fixture()
def store(tmp_path: Path) -> TinkerStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'lorafleet.db'}")
    migrate(engine)
    return TinkerStore(engine)


def test_sample_rows_go_to_samplers_and_orphans_fail(store: TinkerStore, tmp_path: Path) -> None:
    first = store.add_request("t1", "completion:a", 0, SAMPLE, {"base_model": "tiny"})
    second = store.add_request("t1", "completion:b", 0, SAMPLE, {"base_model": "tiny"})
    assert store.pending_requests() == []  # pack hosts never see them
    assert [r.id for r in store.pending_samples()] == [first.id, second.id]
    store.mark_sent([first.id])  # handed to a sampler by a scheduler that then went away
    done = store.add_request("t1", "completion:c", 0, SAMPLE, {})
    store.mark_sent([done.id])
    store.finish(done.id, {"choices": []}, None)
    store.mark_sent([second.id])
    dispatch = SampleDispatch(
        store, {}, ObjectStoreConfig(url=str(tmp_path / "objects")), str(tmp_path), "ns"
    )
    assert dispatch.pass_once() is False  # nothing pending: Ray is not touched
    assert store.request("t1", first.id).state == FAILED
    assert "ask again" in (store.request("t1", second.id).error or "")
    assert store.request("t1", done.id).state == DONE
