"""/metrics: parsed with prometheus_client's own parser; job gauges, API latency by route
template (no job id in any label), the optional token, a scheduler's own endpoint, pack
hosts and slots as the hosts report them, publish seconds from the workers' published
events, and object-store errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.routers.metrics import exposition
from api.server_process import free_port
from core.objectstore import ObjectStoreConfig
from core.s3_objectstore import S3ObjectStore
from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, upload
from tests.conftest import wait_for_condition
from tests.orchestrator.test_host_scheduling import make_world

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_jobs_by_status(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
    for _ in range(2):
        client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
    found = samples(client.get("/metrics").text)
    assert found[("lorafleet_jobs", (("status", "validating_files"),))] == 2
    assert found[("lorafleet_jobs", (("status", "cancelled"),))] == 1
    assert found[("lorafleet_jobs", (("status", "succeeded"),))] == 0
    assert found[("lorafleet_queue_depth", ())] == 0
    assert found[("lorafleet_slots_in_use", ())] == 0


def test_api_latency_is_labelled_by_route_template_never_by_job_id(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]
    route = "/v1/fine_tuning/jobs/{job_id}"

    def count() -> float:
        key = (
            "lorafleet_api_request_seconds_count",
            (("method", "GET"), ("route", route)),
        )
        return samples(client.get("/metrics").text).get(key, 0.0)

    before = count()
    for _ in range(3):
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
    assert count() == before + 3
    text = client.get("/metrics").text
    assert job_id not in text and file_id not in text


def test_a_metrics_token_is_required_when_set(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"metrics_token": "s3cret"}))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert samples(ok.text)[("lorafleet_queue_depth", ())] == 0


def test_a_scheduler_serves_its_own_metrics(settings: Settings, tmp_path: Path) -> None:
    """The endpoint runs on its own thread: it answers even while the scheduler's loop has
    no Ray cluster to reach (none is given here; what it trains is tested elsewhere)."""
    port = free_port()
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(settings.data_dir),
        "LORAFLEET_METRICS_TOKEN": "tok",
        "RAY_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    with open(tmp_path / "scheduler.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "scheduler", "--metrics-port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "scheduler.log").read_text()
            try:
                return httpx.get(url, timeout=2).status_code == 401
            except httpx.TransportError:
                return False

        wait_for_condition(up, timeout=120, what="the scheduler's /metrics")
        found = samples(httpx.get(url, headers={"Authorization": "Bearer tok"}).text)
        assert found[("lorafleet_jobs", (("status", "queued"),))] == 0
        assert found[("lorafleet_trained_steps_total", ())] == 0
        assert ("lorafleet_step_seconds_count", ()) in found
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def hosts(found: Samples, mode: str, state: str) -> float:
    return found.get(("lorafleet_hosts", (("mode", mode), ("state", state))), 0.0)


def test_hosts_and_slots_in_use_are_what_the_pack_hosts_report(
    tmp_path: Path, ray_address: str
) -> None:
    """A scheduler on in-memory pack hosts (Ray only for its connection); the
    figures are read through the same exposition GET /metrics serves for this store."""
    world = make_world(tmp_path, max_slots_per_host=4)
    scheduler = Scheduler(
        world.settings, world.store, world.objects, RayConnection(world.settings), world.hosts
    )
    steps_before = samples(exposition(world.store).decode())[("lorafleet_trained_steps_total", ())]
    first, second = world.submit(), world.submit(tenant="t2")
    scheduler.tick()  # both join one new host
    scheduler.tick()  # the host's poll reports both slots
    found = samples(exposition(world.store).decode())
    (host_id,) = world.hosts.list_hosts()
    assert world.hosts.hosts[host_id].members.keys() == {first, second}
    assert hosts(found, "hosts", "busy") == 1 and hosts(found, "hosts", "idle") == 0
    assert found[("lorafleet_slots_in_use", ())] == 2
    for _ in range(20):
        world.hosts.step()
        scheduler.tick()
        if all(world.job(j).status == "succeeded" for j in (first, second)):
            break
    scheduler.tick()  # the ended jobs' slots were released at the last poll
    found = samples(exposition(world.store).decode())
    assert hosts(found, "hosts", "busy") == 0 and hosts(found, "hosts", "idle") == 1
    assert found[("lorafleet_slots_in_use", ())] == 0
    stored_steps = sum(1 for j in (first, second) for e in world.events(j) if e.type == "metrics")
    assert stored_steps == 6
    assert found[("lorafleet_trained_steps_total", ())] == steps_before + stored_steps
    text = exposition(world.store).decode()
    assert first not in text and second not in text and host_id not in text


def host_memory(found: Samples) -> set[tuple[float, float]]:
    """(peak, estimate) bytes per rank of each host shape in an exposition."""
    peaks = {k[1]: v for k, v in found.items() if k[0] == "lorafleet_host_peak_bytes_per_rank"}
    estimates = {
        k[1]: v for k, v in found.items() if k[0] == "lorafleet_host_estimate_bytes_per_rank"
    }
    assert peaks.keys() == estimates.keys()
    assert all(dict(labels).keys() == {"shape"} for labels in peaks)
    return {(peaks[labels], estimates[labels]) for labels in peaks}


def test_object_store_errors_are_counted_by_outcome() -> None:
    def errors() -> tuple[float, float]:
        found = samples(exposition_of_registry())
        return (
            found[("lorafleet_object_store_errors_total", (("outcome", "retried"),))],
            found[("lorafleet_object_store_errors_total", (("outcome", "gave_up"),))],
        )

    before = errors()
    nobody_there = f"http://127.0.0.1:{free_port()}"
    store = S3ObjectStore(
        ObjectStoreConfig("s3://bucket/p", nobody_there, "key", "secret"), retries=3
    )
    try:
        store.exists("files/t/file-1.jsonl")
    except Exception as exc:  # noqa: BLE001 - which transport error boto3 raises varies
        assert "Could not connect" in str(exc), exc
    else:
        raise AssertionError("a store with no server answered")
    retried, gave_up = errors()
    assert (retried - before[0], gave_up - before[1]) == (2, 1)


def exposition_of_registry() -> str:
    from prometheus_client import generate_latest

    from orchestrator.metrics import REGISTRY

    return generate_latest(REGISTRY).decode()


@pytest.mark.slow
def test_a_trained_job_shows_in_hosts_slots_steps_and_publish_seconds(
    settings: Settings, ray_address: str
) -> None:
    """One real job (Ray Train + DeepSpeed, on a pack host) through the API with its
    scheduler: while it trains, one busy host and one slot; once published, the publish
    histogram holds the seconds its worker put in the published event, and every stored
    step was counted."""
    on_ray = settings.model_copy(
        update={
            "scheduler_poll_seconds": 0.2,
            # Its own namespace: a host another test left idle on the session's Ray (its
            # object store elsewhere) is never adopted here.
            "ray_namespace": f"lf-metrics-{uuid.uuid4().hex[:8]}",
            "host_idle_seconds": 2.0,  # the host leaves the session's Ray soon after
        }
    )
    with TestClient(create_app(on_ray, run_scheduler=True)) as client:
        before = samples(client.get("/metrics").text)
        file_id = upload(client, GOOD_RECORDS * 8)["id"]  # type: ignore[arg-type]
        job_id = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 2}},
        ).json()["id"]
        seen_training: list[Samples] = []
        seen_memory: set[tuple[float, float]] = set()  # (peak, estimate) per rank

        def done() -> bool:
            found = samples(client.get("/metrics").text)
            if found[("lorafleet_slots_in_use", ())] == 1:
                seen_training.append(found)
            seen_memory.update(host_memory(found))
            status = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
            assert status not in ("failed", "cancelled"), status
            return bool(status == "succeeded")

        wait_for_condition(done, timeout=300, interval=0.2, what=f"{job_id} to succeed")
        after = samples(client.get("/metrics").text)
        data: list[dict[str, Any]] = []
        page: dict[str, Any] = {"has_more": True, "data": [{"id": None}]}
        while page["has_more"]:
            cursor = {"after": page["data"][-1]["id"]} if data else {}
            page = client.get(
                f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, **cursor}
            ).json()
            data += page["data"]
    # Stored as a "message" (OpenAI's event types); the worker's data is kept as it sent it.
    published = [e["data"] for e in data if "publish_seconds" in (e["data"] or {})]
    assert len(published) == 1, [e["message"] for e in data]
    steps = [e for e in data if e["type"] == "metrics" and "step" in (e["data"] or {})]
    assert seen_training, "never saw the job's slot in use"
    assert hosts(seen_training[-1], "hosts", "busy") == 1
    assert after[("lorafleet_slots_in_use", ())] == 0

    # The host's memory per rank, by shape: what its memory event told the job.
    told = {
        (float(e["data"]["measured_peak_bytes"]), float(e["data"]["estimate_bytes"]))
        for e in data
        if "measured_peak_bytes" in (e["data"] or {})
    }
    assert len(told) == 1 and seen_memory == told, (seen_memory, told)
    [(peak, estimate)] = told
    assert peak > 0 and estimate > 0  # how close they are: tests/e2e/test_memory_*

    def delta(name: str) -> float:
        return after[(name, ())] - before[(name, ())]

    assert delta("lorafleet_publish_seconds_count") == 1
    assert delta("lorafleet_publish_seconds_sum") == pytest.approx(published[0]["publish_seconds"])
    assert 0 < published[0]["publish_seconds"] < 60
    assert delta("lorafleet_trained_steps_total") == len(steps) > 0
    assert delta("lorafleet_step_seconds_count") == len(steps)
