"""Sampling sessions end with their Tinker session (orchestrator.tinker.samplers): the row
turns `sampler_ended`, what it had queued fails, a later request for it is a 400 naming it,
and the base's sampler is told to drop the weights no live sampling session still samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.objectstore import ObjectStoreConfig
from orchestrator.db import make_engine, migrate
from orchestrator.errors import InvalidRequest
from orchestrator.tinker.rows import FAILED, SAMPLE
from orchestrator.tinker.samplers import SAMPLER_ENDED, create_sampler, sampler
from orchestrator.tinker.sampling import SampleDispatch
from orchestrator.tinker.store import TinkerStore


@pytest.fixture()
def store(tmp_path: Path) -> TinkerStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'lorafleet.db'}")
    migrate(engine)
    return TinkerStore(engine)


class Remote:
    """What the dispatcher calls on a sampler actor's handle (`handle.release.remote`)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def remote(self, prefixes: list[str]) -> None:
        self.calls.append(prefixes)


class SamplerHandle:
    def __init__(self) -> None:
        self.release = Remote()


def test_an_ended_sessions_samplers_end_and_their_weights_are_released(
    store: TinkerStore, tmp_path: Path
) -> None:
    ending, staying = store.create_session("t1"), store.create_session("t1")

    def open_sampler(session: str, seq: int, prefix: str | None) -> Any:
        return create_sampler(store, "t1", session, seq, "tiny", None, prefix)

    own = open_sampler(ending, 1, "tinker/t1/m/sampler_weights/sampler-1/")
    shared = open_sampler(ending, 2, "tinker/t1/m/sampler_weights/shared/")
    open_sampler(ending, 3, None)  # the base alone: nothing to release
    other = open_sampler(staying, 1, "tinker/t1/m/sampler_weights/shared/")
    dispatch = SampleDispatch(
        store, {}, ObjectStoreConfig(url=str(tmp_path / "objects")), str(tmp_path), "ns"
    )
    handle = SamplerHandle()
    dispatch._actors["tiny"] = handle  # the running sampler of the base
    dispatch.pass_once()  # nothing ended yet
    assert handle.release.calls == []
    queued = store.add_request("t1", own.id, 0, SAMPLE, {"base_model": "tiny"})
    store.finish_session("t1", ending, "finished")
    dispatch._ended_checked = 0.0  # the next look is due (and comes before any handing over)
    dispatch.pass_once()
    # Only the weights no live sampling session samples ("shared" is still in use).
    assert handle.release.calls == [["tinker/t1/m/sampler_weights/sampler-1/"]]
    failed = store.request("t1", queued.id)
    assert failed.state == FAILED and f"sampling session {own.id} ended" in (failed.error or "")
    assert store.model("t1", own.id).state == SAMPLER_ENDED
    with pytest.raises(InvalidRequest) as ended:
        sampler(store, "t1", shared.id)
    assert ended.value.param == "sampling_session_id" and "ended" in ended.value.message
    assert sampler(store, "t1", other.id).id == other.id  # the other session's lives on
    dispatch._ended_checked = 0.0
    dispatch.pass_once()
    assert len(handle.release.calls) == 1  # each ended once
    store.finish_session("t1", staying, "finished")
    dispatch._ended_checked = 0.0
    dispatch.pass_once()
    assert handle.release.calls[-1] == ["tinker/t1/m/sampler_weights/shared/"]
