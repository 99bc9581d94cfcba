"""Usage per tenant (issue 21): the split of a pass's device-seconds by tokens, the tokens each
kind of work spends, and the store's counting: a job's metrics events and a Tinker answer
each add to their tenant's day once, however often they are sent (SQLite; the API test runs
on PostgreSQL too)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from core.usage import request_tokens, sample_tokens, split_device_seconds, utc_day
from orchestrator.db import make_engine, migrate
from orchestrator.errors import InvalidRequest
from orchestrator.store import JobStore
from orchestrator.tinker.store import TinkerStore
from orchestrator.usage import UsageStore, date_range
from tests.conftest import job_row

DAY = dt.datetime(2026, 12, 1, 23, 59, 59, tzinfo=dt.UTC).timestamp()  # just before midnight


def test_a_pass_is_split_by_token_share_and_the_shares_add_up() -> None:
    shares = split_device_seconds(0.5, 2, {"a": 300, "b": 100})
    assert shares == pytest.approx({"a": 0.75, "b": 0.25})
    assert sum(split_device_seconds(0.37, 4, {"a": 7, "b": 11, "c": 13}).values()) == (
        pytest.approx(0.37 * 4)
    )
    # A member without tokens (an optim_step beside forward work) shares nothing …
    assert split_device_seconds(1.0, 1, {"a": 10, "b": 0}) == {"a": 1.0, "b": 0.0}
    # … unless no member has any: the pass still ran, and they share it equally.
    assert split_device_seconds(1.0, 2, {"a": 0, "b": 0}) == {"a": 1.0, "b": 1.0}
    assert split_device_seconds(1.0, 2, {}) == {}


def test_each_kind_of_work_spends_its_own_tokens() -> None:
    data = {"data": [{"tokens": [1, 2, 3]}, {"tokens": [4, 5]}]}
    assert request_tokens("forward_backward", data) == {"trained": 5}
    assert request_tokens("forward", data) == {"prefilled": 5}
    assert request_tokens("optim_step", {"adam_params": {}}) == {}
    answer = {"prompt_tokens": 4, "choices": [{"tokens": [1, 2]}, {"tokens": [3, 4, 5]}]}
    assert sample_tokens(answer) == {"prefilled": 4, "sampled": 5}  # the prompt once for n
    assert sample_tokens({"error": "prompt: it has no tokens", "param": "prompt"}) == {}
    assert utc_day(DAY) == "2026-12-01" and utc_day(DAY + 1) == "2026-12-02"


def metrics(step: int, tokens: int, seconds: float, at: float) -> dict[str, Any]:
    data = {"time": at, "step": step, "step_tokens": tokens, "device_seconds": seconds}
    return {"type": "metrics", "message": f"Step {step}", "data": data}


@pytest.fixture()
def engine(tmp_path: Path) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'lorafleet.db'}")
    migrate(engine)
    return engine


def test_a_jobs_metrics_events_count_once_in_their_tenants_days(engine: Any) -> None:
    store, usage = JobStore(engine), UsageStore(engine)
    mine = store.add_job(job_row(tenant="acme", status="running", attempt=1), "Created")
    theirs = store.add_job(job_row(tenant="globex", status="running", attempt=1), "Created")
    first = [metrics(1, 120, 0.25, DAY), metrics(2, 80, 0.125, DAY + 1)]
    evaluation = {"type": "metrics", "message": "eval", "data": {"time": DAY, "evaluation": "x"}}
    assert store.record_run_events(mine.id, 1, [*first, evaluation], cursor=3)
    # The same batch again (a scheduler that polled the host twice): fenced, counted once.
    assert not store.record_run_events(mine.id, 1, [*first, evaluation], cursor=3)
    assert store.record_run_events(theirs.id, 1, [metrics(1, 40, 0.5, DAY)], cursor=1)

    days = usage.days("acme", dt.date(2026, 11, 1), dt.date(2026, 12, 31))
    assert [(d.day, d.tokens_trained, d.device_seconds) for d in days] == [
        ("2026-12-01", 120, 0.25),
        ("2026-12-02", 80, 0.125),
    ]
    assert days[0].tokens_prefilled == days[0].tokens_sampled == 0
    assert usage.totals() == {
        "acme": {"trained": 200, "prefilled": 0, "sampled": 0, "device_seconds": 0.375},
        "globex": {"trained": 40, "prefilled": 0, "sampled": 0, "device_seconds": 0.5},
    }


def test_a_tinker_answer_counts_once_as_its_row_is_answered(engine: Any) -> None:
    tinker, usage = TinkerStore(engine), UsageStore(engine)
    session = tinker.create_session("acme")
    model = tinker.create_model("acme", session, 0, "tiny-llama", {"rank": 4}).model_id
    row = tinker.add_request("acme", model, 1, "forward_backward", {"data": []})
    tinker.mark_sent([row.id])
    used = {"tokens": {"trained": 9}, "device_seconds": 0.5}
    tinker.finish(row.id, {"outputs": []}, None, used)
    tinker.finish(row.id, {"outputs": []}, None, used)  # written again: nothing more
    sample = tinker.add_request("acme", "completion:x", 0, "sample", {})
    tinker.finish(sample.id, {"choices": []}, None, {"tokens": {"prefilled": 3, "sampled": 0}})
    [today] = usage.days("acme", dt.date(2000, 1, 1), dt.date(2100, 1, 1))
    assert (today.tokens_trained, today.tokens_prefilled, today.device_seconds) == (9, 3, 0.5)
    assert usage.days("globex", dt.date(2000, 1, 1), dt.date(2100, 1, 1)) == []


@pytest.mark.parametrize(
    ("start", "end", "param"),
    [
        ("2026-13-01", None, "start_date"),
        ("yesterday", None, "start_date"),
        (None, "2026-1-5", "end_date"),
        ("2026-12-02", "2026-12-01", "start_date"),  # after the end
        ("2020-01-01", "2026-12-01", "start_date"),  # more than a year of days
    ],
)
def test_bad_dates_name_their_field(start: str | None, end: str | None, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        date_range(start, end, dt.date(2026, 12, 2))
    assert caught.value.param == param, caught.value.message


def test_the_default_range_is_the_30_days_ending_today() -> None:
    today = dt.date(2026, 12, 2)
    assert date_range(None, None, today) == (dt.date(2026, 11, 3), today)
    assert date_range("2026-12-01", None, today) == (dt.date(2026, 12, 1), today)
