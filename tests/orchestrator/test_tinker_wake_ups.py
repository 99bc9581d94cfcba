"""Tinker requests without polls (orchestrator.store.changes, orchestrator.tinker.store): a
new request row wakes the dispatcher and an answer wakes that request's `retrieve_future`
as they commit: in one process (SQLite, `serve`), and from another process through
PostgreSQL's LISTEN/NOTIFY (`serve --no-scheduler` beside `lorafleet scheduler`). Nothing
here polls: each wait is far longer than the wake-up may take."""

from __future__ import annotations

import asyncio
import threading
from contextlib import ExitStack

from orchestrator.db import make_engine, migrate
from orchestrator.store.changes import EVERY_JOB, Changes
from orchestrator.store.listener import ChangeListener, listen_for_changes
from orchestrator.tinker.rows import DONE
from orchestrator.tinker.store import TinkerStore

WAIT = 10.0  # how long a wake-up may take here (a loaded CI machine)
LORA = {"rank": 4, "seed": 0}


def test_an_answer_wakes_only_its_own_future() -> None:
    changes = Changes()

    async def future() -> list[bool]:
        with changes.watching_answer("treq-a") as answered:
            got = [await answered.wait(0.01)]  # nothing yet: the fallback poll's timeout
            threading.Thread(target=changes.tinker_answers, args=(["treq-b"],)).start()
            got.append(await answered.wait(0.2))  # another request's answer: still nothing
            threading.Thread(target=changes.tinker_answers, args=(["treq-a"],)).start()
            got.append(await answered.wait(WAIT))
            answered.clear()
            changes.tinker_answers([EVERY_JOB])  # a model's requests all failed at once
            got.append(await answered.wait(WAIT))
        return got

    assert asyncio.run(future()) == [False, False, True, True]


def test_a_request_wakes_the_dispatcher_and_its_answer_the_future(database_url: str) -> None:
    api_engine = make_engine(database_url)
    migrate(api_engine)
    api = TinkerStore(api_engine, Changes())
    split = api_engine.dialect.name == "postgresql"
    # Embedded, the dispatcher shares the API's wake-ups; split, it is another process's
    # store on an engine of its own, which only NOTIFY reaches.
    scheduler_engine = make_engine(database_url) if split else api_engine
    scheduler = TinkerStore(scheduler_engine, Changes() if split else api.changes)
    with ExitStack() as stack:
        for engine, store in ((api_engine, api), (scheduler_engine, scheduler)):
            listener = listen_for_changes(engine, store.changes) if split else None
            if isinstance(listener, ChangeListener):
                stack.callback(listener.stop)
                assert listener.listening.wait(WAIT)
        new_rows = threading.Event()
        stack.enter_context(scheduler.changes.on_tinker_requests(new_rows.set))

        session = api.create_session("t1")
        created = api.create_model("t1", session, 0, "tiny-llama", LORA)
        assert new_rows.wait(WAIT), "the dispatcher was not woken by a new request row"
        (row,) = scheduler.pending_requests()
        assert row.id == created.id

        registered = threading.Event()

        async def retrieve() -> bool:
            with api.changes.watching_answer(created.id) as answered:
                answered.clear()
                assert api.request("t1", created.id).state != DONE
                registered.set()
                return await answered.wait(WAIT)

        woken: list[bool] = []
        future = threading.Thread(target=lambda: woken.append(asyncio.run(retrieve())))
        future.start()
        assert registered.wait(WAIT)
        scheduler.finish_many(
            [{"request_id": created.id, "result": {"model_id": row.model_id}, "error": None}]
        )
        future.join(WAIT)
        assert woken == [True], "the future was not woken by its answer"
        assert api.request("t1", created.id).state == DONE
