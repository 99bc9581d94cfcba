"""The scheduler's sampling step played in the test's process: a real Sampler (no Ray)
answers the `sample` rows as the dispatcher's sampler actor would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.db import make_engine
from orchestrator.settings import Settings
from orchestrator.tinker.store import TinkerStore
from workers.sampling.sampler import Sampler


@contextmanager
def samples_answered(settings: Settings, base: Path) -> Iterator[Sampler]:
    store = TinkerStore(make_engine(settings.database_url))
    sampler = Sampler(base, settings.object_store_config)
    stop = threading.Event()

    def serve() -> None:
        while not stop.wait(0.02):
            try:
                pending = store.pending_samples()
            except Exception:  # the API has not made its tables yet
                continue
            for row in pending:
                store.mark_sent([row.id])
                store.finish(row.id, sampler.sample(row.payload), None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        stop.set()
        thread.join(timeout=10)
