"""Live event streams (`?stream=true`) never hold up other requests: their store reads run
in threads, not on the event loop, and not in the threads other requests need. Shown
without timing anything: every open stream's read is held stuck in the store, and listing
jobs still answers, every time, while not one of those reads has come back."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from orchestrator.store import JobStore
from tests.api.conftest import GOOD_RECORDS, upload
from tests.conftest import wait_for_condition

STREAMS = 50
LIST_REQUESTS = 40
STUCK_AT_MOST_SECONDS = 120  # a read held longer than the test: it lets go anyway


class StuckReads:
    """Wraps a store read so it waits until released: a database that stopped answering."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.entered = 0
        self.returned = 0

    def wrap(self, read: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(read)
        def stuck_read(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.entered += 1
            self.released.wait(STUCK_AT_MOST_SECONDS)
            try:
                return read(*args, **kwargs)
            finally:
                with self.lock:
                    self.returned += 1

        return stuck_read


async def _list_while_streams_are_stuck(url: str, job_id: str, stuck: StuckReads) -> list[int]:
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        opened = asyncio.Event()
        open_count = 0

        async def stream() -> None:
            nonlocal open_count
            path = f"/v1/fine_tuning/jobs/{job_id}/events"
            async with client.stream("GET", path, params={"stream": "true"}) as response:
                assert response.status_code == 200
                open_count += 1
                if open_count == STREAMS:
                    opened.set()
                async for _ in response.aiter_lines():
                    pass

        streams = [asyncio.create_task(stream()) for _ in range(STREAMS)]
        try:
            await asyncio.wait_for(opened.wait(), timeout=60)
            await asyncio.to_thread(
                wait_for_condition, lambda: stuck.entered > 0, 30, 0.05, "a stream's read stuck"
            )
            statuses = []
            for _ in range(LIST_REQUESTS):
                response = await client.get("/v1/fine_tuning/jobs")
                statuses.append(response.status_code)
            assert stuck.returned == 0, "a stream's read came back before listing was done"
            return statuses
        finally:
            stuck.released.set()
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)


def test_open_streams_on_a_stuck_store_do_not_hold_up_listing_jobs(
    live_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as client:
        file_id = upload(client, GOOD_RECORDS)["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
        job_id = job.json()["id"]  # stays queued: no scheduler, so every stream stays open
    # The read each live stream makes on every pass sticks; listing's reads do not.
    stuck = StuckReads()
    monkeypatch.setattr(JobStore, "events_since", stuck.wrap(JobStore.events_since))

    statuses = asyncio.run(_list_while_streams_are_stuck(live_server, job_id, stuck))
    assert statuses == [200] * LIST_REQUESTS
