"""Live event streams (`?stream=true`) never hold up other requests: their store reads run
in threads, not on the event loop, even when the database is slow."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from orchestrator.store import JobStore
from tests.api.conftest import GOOD_RECORDS, upload

STREAMS = 50
SLOW_READ_SECONDS = 0.2
LIST_REQUESTS = 40
P95_LIMIT_SECONDS = 0.1


def slowed(read: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(read)
    def slow_read(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLOW_READ_SECONDS)
        return read(*args, **kwargs)

    return slow_read


async def _measure(url: str, job_id: str) -> list[float]:
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
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
        await asyncio.wait_for(opened.wait(), timeout=60)
        await asyncio.sleep(1.0)  # every stream is polling now
        latencies = []
        for _ in range(LIST_REQUESTS):
            started = time.perf_counter()
            response = await client.get("/v1/fine_tuning/jobs")
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200
            await asyncio.sleep(0.02)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    return latencies


def test_open_streams_on_a_slow_store_do_not_slow_listing_jobs(
    live_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as client:
        file_id = upload(client, GOOD_RECORDS)["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
        job_id = job.json()["id"]  # stays queued: no scheduler, so every stream stays open
    # The reads a live stream makes, slowed as on a busy database; listing is not slowed.
    for name in ("get_job", "events_since"):
        monkeypatch.setattr(JobStore, name, slowed(getattr(JobStore, name)))

    latencies = asyncio.run(_measure(live_server, job_id))
    p95 = statistics.quantiles(latencies, n=20)[-1]
    assert p95 < P95_LIMIT_SECONDS, f"p95 {p95 * 1000:.0f} ms with {STREAMS} streams open"
