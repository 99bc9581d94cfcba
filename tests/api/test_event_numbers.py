"""Events are never skipped: with concurrent writers appending to one job (on PostgreSQL
each insert made slow by a test trigger, so transactions overlap and would commit out of
order), a live SSE reader and a client tailing with `after=` pages each see every event
exactly once, in order."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import text

from orchestrator.db import make_engine
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from tests.api.conftest import GOOD_RECORDS, serve_live, upload

WRITERS, EACH = 4, 40
SLOW_INSERTS = [
    """CREATE FUNCTION slow_event() RETURNS trigger AS $$
    BEGIN PERFORM pg_sleep(random() * 0.02); RETURN NEW; END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER slow_event AFTER INSERT ON job_events FOR EACH ROW
    EXECUTE FUNCTION slow_event()""",
]


def stream_events(url: str, job_id: str, seen: list[str]) -> None:
    with (
        httpx.Client(base_url=url, timeout=120) as client,
        client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true") as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                seen.append(json.loads(line.removeprefix("data: "))["id"])


def tail_with_pages(url: str, job_id: str, seen: list[str], done: threading.Event) -> None:
    """A client following a job with the list route: the newest page, then `after=` back
    to the newest event it had already seen; once more after the writers are done."""
    with httpx.Client(base_url=url, timeout=120) as client:
        last_pass = False
        while not last_pass:
            last_pass = done.is_set()
            new: list[str] = []
            after: str | None = None
            while True:
                params: dict[str, str | int] = {"limit": 7}
                if after:
                    params["after"] = after
                page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
                ids = [e["id"] for e in page["data"]]
                fresh = ids[: ids.index(seen[-1])] if seen and seen[-1] in ids else ids
                new.extend(fresh)
                if len(fresh) < len(ids) or not page["has_more"]:
                    break
                after = ids[-1]
            seen.extend(reversed(new))


def test_concurrent_writers_readers_see_every_event_once_in_order(settings: Settings) -> None:
    with serve_live(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        engine = make_engine(settings.database_url)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                for statement in SLOW_INSERTS:
                    connection.execute(text(statement))
        file_id = upload(client, GOOD_RECORDS)["id"]
        job_id = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
        ).json()["id"]
        store = JobStore(engine)

        streamed: list[str] = []
        paged: list[str] = []
        writers_done = threading.Event()
        sse = threading.Thread(target=stream_events, args=(url, job_id, streamed))
        pager = threading.Thread(target=tail_with_pages, args=(url, job_id, paged, writers_done))
        sse.start()
        pager.start()

        def write(writer: int) -> None:
            for n in range(EACH):
                assert store.warn(job_id, 0, f"w{writer} e{n}", {"writer": writer, "n": n})

        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(write, range(WRITERS)))
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
        writers_done.set()
        sse.join(timeout=120)
        pager.join(timeout=120)

        stored = store.events_since(job_id, 0)
    expected = [row.id for row in stored]
    assert len(expected) == WRITERS * EACH + 2  # created, every write, cancelled
    assert [row.job_seq for row in stored] == list(range(1, len(expected) + 1))
    assert streamed == expected
    assert paged == expected
    for writer in range(WRITERS):  # each writer's own events in the order it wrote them
        mine = [r.data["n"] for r in stored if r.data and r.data.get("writer") == writer]
        assert mine == list(range(EACH))
