"""The scheduler's side of a store outage (a real radosgw, stopped): a job whose adapter was
published but cannot be verified stays running, with one warning event, and succeeds on a
later tick once the store is back; a tick the store fails is logged once per outage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.object_keys import file_key
from core.objectstore import ObjectStoreConfig, open_object_store
from orchestrator.scheduling import outcomes
from orchestrator.scheduling.host_scheduling import HostScheduling
from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.scheduler import Scheduler
from tests.conftest import job_row
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


@pytest.mark.slow
@pytest.mark.faults
def test_a_tick_the_store_fails_is_logged_once_per_outage(
    tmp_path: Path,
    radosgw: RadosGW,
    s3_bucket: str,
    ray_address: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job whose files are checked while the store is away: each tick fails and is
    retried, said once (not a traceback per tick), and the job is queued once it is back."""
    world = make_world(tmp_path, ray_address=ray_address)
    objects = open_object_store(
        ObjectStoreConfig(
            url=f"s3://{s3_bucket}/lorafleet",
            endpoint_url=radosgw.endpoint_url,
            access_key_id=radosgw.access_key_id,
            secret_access_key=radosgw.secret_access_key,
        ),
        retries=1,
    )
    objects.put_bytes(file_key("t1", "file-x"), b'{"prompt": "1+1=", "completion": "2"}\n')
    scheduler = Scheduler(
        world.settings, world.store, objects, RayConnection(world.settings), world.hosts
    )
    job_id = world.store.add_job(job_row(training_file="file-x"), "created").id
    caplog.set_level(logging.INFO, logger="orchestrator.scheduling.scheduler")
    try:
        radosgw.stop_gateway()
        assert not scheduler.tick_safely()
        assert not scheduler.tick_safely()
    finally:
        radosgw.start_gateway()
    said = [r for r in caplog.records if "object store unavailable" in r.getMessage()]
    assert len(said) == 1 and not [r for r in caplog.records if r.exc_info]
    assert world.job(job_id).status == "validating_files"
    assert scheduler.tick_safely()
    assert world.job(job_id).status in ("queued", "running")  # validated, then placed
    assert "object store available again" in caplog.text
