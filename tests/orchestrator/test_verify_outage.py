"""The scheduler's side of a store outage: a job whose adapter was published but cannot be
verified because the object store (a real radosgw) is away stays running, with one warning
event, and succeeds on a later tick once the store is back; nothing is failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.objectstore import ObjectStoreConfig, open_object_store
from orchestrator.scheduling import outcomes
from orchestrator.scheduling.host_scheduling import HostScheduling
from tests.fakes.in_memory_hosts import InMemoryHosts
from tests.orchestrator.test_host_scheduling import make_world
from tests.services.radosgw import RadosGW


@pytest.mark.faults
def test_a_published_job_waits_out_the_store_and_then_succeeds(
    tmp_path: Path, radosgw: RadosGW, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = make_world(tmp_path)
    objects = open_object_store(
        ObjectStoreConfig(
            url=f"s3://{s3_bucket}/lorafleet",
            endpoint_url=radosgw.endpoint_url,
            access_key_id=radosgw.access_key_id,
            secret_access_key=radosgw.secret_access_key,
        ),
        retries=2,
    )
    hosts = InMemoryHosts(objects, clock=world.clock)
    scheduling = HostScheduling(world.settings, world.store, objects, hosts, clock=world.clock)
    job_id = world.submit()
    scheduling.watch()
    scheduling.launch()
    for _ in range(4):  # joins, then three steps: the last one publishes the adapter
        hosts.step()
    try:
        radosgw.stop_gateway()
        for _ in range(3):  # the first tick finds the store away; the next ones wait
            scheduling.watch()
        job = world.job(job_id)
        assert job.status == "running", job.error_message
        warnings = [e for e in world.events(job_id) if "Object store unavailable" in e.message]
        assert len(warnings) == 1, [e.message for e in world.events(job_id)]
        assert hosts.job_host(job_id) is not None  # the host still keeps the job
    finally:
        radosgw.start_gateway()
    monkeypatch.setattr(outcomes, "STORE_AWAY_PAUSE_S", 0.0)
    scheduling.watch()
    job = world.job(job_id)
    assert job.status == "succeeded" and job.attempt == 1
    scheduling.watch()
    assert hosts.job_host(job_id) is None  # released once it succeeded
