"""The object store stops answering while a job trains and publishes (the S3 server is
killed, then started again): a checkpoint or the adapter falls due during the outage; a
checkpoint is skipped (said once) while training goes on, the adapter waits for the store;
the job succeeds once the store is back, and no manifest ever points at an incomplete
adapter."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core.objectstore import ObjectStoreConfig, open_object_store
from core.publish import PublishError, verify_adapter
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.faults]
OUTAGE_S = 8
EPOCHS, BATCH = 8, 4
TOTAL_STEPS = EPOCHS * len(DATA) // BATCH  # checkpoints at each epoch's end, publish at the last


def last_step(events: list[dict[str, Any]]) -> int:
    return max((e["data"]["step"] for e in events if e["type"] == "metrics"), default=0)


def test_a_store_outage_delays_a_job_but_never_publishes_half_an_adapter(
    server: LorafleetServer,
) -> None:
    s3 = server.s3
    assert s3 is not None
    store = open_object_store(
        ObjectStoreConfig(
            url=f"s3://{server.bucket}/lorafleet",
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
        )
    )
    with server.client() as client:
        job = submit(
            client,
            model="tiny-llama",
            training_file=upload(client, DATA),
            hyperparameters={"n_epochs": EPOCHS, "batch_size": BATCH},
            resources={"num_workers": 2},
        )

        def training() -> bool:
            page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
            return any(e["type"] == "metrics" for e in page)

        wait_for_condition(training, timeout=300, interval=0.2, what="the first training step")
        attempt = started(server, client, job["id"])["attempt"]
        s3.stop_gateway()
        time.sleep(2)  # every step taken before the stop has reached the events by now
        before = last_step(server.all_events(client, job["id"]))
        time.sleep(OUTAGE_S - 2)
        during = last_step(server.all_events(client, job["id"]))
        s3.start_gateway()
        restarted_at = int(time.time())
        # Some write fell due while the store was away: an epoch-end checkpoint, or the
        # adapter itself (after the last step); steps went on (or stopped at that write).
        steps_per_epoch = len(DATA) // BATCH
        # (Stuck since before the stop at a write that fell due then counts too.)
        first = before + 1 if during > before else before
        due = [s for s in range(first, during + 1) if s % steps_per_epoch == 0]
        assert due, f"no checkpoint or publish fell in steps {before + 1}..{during}"

        def succeeded_and_whole() -> bool:
            try:  # whenever a manifest is visible, the files must match it
                verify_adapter(store, "default", job["id"], attempt)
            except PublishError as exc:
                assert "no manifest" in str(exc), exc
            return client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] in (
                "succeeded",
                "failed",
            )

        wait_for_condition(succeeded_and_whole, timeout=300, interval=0.2, what="the job to end")
        final = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert final["status"] == "succeeded", final
        verify_adapter(store, "default", job["id"], attempt)
        # A write that fell due in the outage was hit by it, rather than happening beside
        # it: a checkpoint skipped (or landed once the store was back, its own retries
        # outlasting the outage), or the adapter published only after the store came back.
        events = server.all_events(client, job["id"])
        hit = [
            e["data"]["step"]
            for e in events
            if (e["data"] or {}).get("step") in due
            and (
                "checkpoint at step" in e["message"]
                or e["message"].startswith("Checkpoint saved")
                and e["created_at"] >= restarted_at
            )
        ]
        published_after = TOTAL_STEPS in due and final["finished_at"] >= restarted_at
        assert hit or published_after, (due, restarted_at, events)


LONG_OUTAGE_S = 60
LONG_EPOCHS = 10  # 60 steps: trained within the outage, so the last step falls inside it


def test_a_60_s_store_outage_across_the_last_step_delays_the_job_and_it_succeeds(
    server: LorafleetServer,
) -> None:
    s3 = server.s3
    assert s3 is not None
    store = open_object_store(
        ObjectStoreConfig(
            url=f"s3://{server.bucket}/lorafleet",
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
        )
    )
    total_steps = LONG_EPOCHS * len(DATA) // BATCH
    with server.client() as client:
        job = submit(
            client,
            model="tiny-llama",
            training_file=upload(client, DATA),
            hyperparameters={"n_epochs": LONG_EPOCHS, "batch_size": BATCH},
            resources={"num_workers": 2},
        )

        def events() -> list[dict[str, Any]]:
            return server.all_events(client, job["id"])

        wait_for_condition(
            lambda: last_step(events()) > 0, timeout=300, interval=0.2, what="the first step"
        )
        attempt = started(server, client, job["id"])["attempt"]
        s3.stop_gateway()
        stopped_at = time.monotonic()
        try:
            # Training goes on without the store; the finished job's publish then waits.
            try:
                wait_for_condition(
                    lambda: any("retrying publish" in e["message"] for e in events()),
                    timeout=300,
                    interval=0.5,
                    what="the publish to wait for the store",
                )
            except AssertionError as exc:
                said = [(e["type"], e["message"]) for e in events() if e["type"] != "metrics"]
                raise AssertionError(f"{exc}; last step {last_step(events())}: {said}") from None
            assert last_step(events()) == total_steps
            # The store stays away for the whole outage (the test's fault, not a wait).
            time.sleep(max(0.0, LONG_OUTAGE_S - (time.monotonic() - stopped_at)))
            away_s = time.monotonic() - stopped_at
            during = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            assert during["status"] == "running", during
            retries = [e for e in events() if "retrying publish" in e["message"]]
            assert 1 <= len(retries) <= 1 + away_s // 60, retries  # not one per try
        finally:
            s3.start_gateway()
        back_at = int(time.time())
        final = server.wait_until_terminal(client, job["id"], timeout=300)
        assert final["status"] == "succeeded", final
        assert final["finished_at"] >= back_at
        verify_adapter(store, "default", job["id"], attempt)
        published = [e for e in events() if e["message"].startswith("Adapter published")]
        assert len(published) == 1 and published[0]["data"]["publish_attempts"] > len(retries)
        # Checkpoints that fell due in the outage were skipped, said once.
        skipped = [e for e in events() if "checkpoint at step" in e["message"]]
        assert len(skipped) <= 1, skipped
