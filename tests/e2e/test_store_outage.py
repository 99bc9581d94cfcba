"""The object store stops answering while a job trains and publishes (the S3 server is
killed, then started again): the job waits, succeeds once the store is back, and no
manifest ever points at an incomplete adapter."""

from __future__ import annotations

import time

import pytest

from core.objectstore import ObjectStoreConfig, open_object_store
from core.publish import PublishError, verify_adapter
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, submit, upload

pytestmark = pytest.mark.slow
OUTAGE_S = 8


def test_a_store_outage_delays_a_job_but_never_publishes_half_an_adapter(
    server: LorafleetServer,
) -> None:
    store = open_object_store(
        ObjectStoreConfig(
            url=f"s3://{server.bucket}/lorafleet",
            endpoint_url=server.s3.endpoint_url,
            access_key_id=server.s3.access_key_id,
            secret_access_key=server.s3.secret_access_key,
        )
    )
    with server.client() as client:
        job = submit(
            client,
            model="tiny-llama",
            training_file=upload(client, DATA),
            hyperparameters={"n_epochs": 8, "batch_size": 4},
            resources={"num_workers": 2},
        )

        def training() -> bool:
            page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
            return any(e["type"] == "metrics" for e in page)

        wait_for_condition(training, timeout=300, interval=0.2, what="the first training step")
        server.s3.stop_gateway()
        time.sleep(OUTAGE_S)
        server.s3.start_gateway()

        def succeeded_and_whole() -> bool:
            try:  # whenever a manifest is visible, the files must match it
                verify_adapter(store, "default", job["id"])
            except PublishError as exc:
                assert "no manifest" in str(exc), exc
            return client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] in (
                "succeeded",
                "failed",
            )

        wait_for_condition(succeeded_and_whole, timeout=300, interval=0.2, what="the job to end")
        final = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert final["status"] == "succeeded", final
        verify_adapter(store, "default", job["id"])
