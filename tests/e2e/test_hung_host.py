"""A pack host hung on purpose on real Ray (its workers SIGSTOPped): the scheduler's watchdog
sees no step for `LORAFLEET_STEP_TIMEOUT_SECONDS`, ends that host, and its job resumes from
its checkpoint on a new host (attempt 2) and succeeds — never a silent hang."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import host_actor_name
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer, end_pack_hosts
from tests.e2e.test_training_job import DATA, started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.faults]

STEP_TIMEOUT_S = 20  # after the first steps; a host still starting gets longer


@pytest.fixture()
def hung_server(tmp_path: Path, tiny_base: Path, ray_address: str) -> Iterator[LorafleetServer]:
    namespace = f"hung-{os.getpid()}-{int(time.time())}"
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny-llama": str(tiny_base)}),
        "LORAFLEET_SCHEDULER_POLL_SECONDS": "0.2",
        "LORAFLEET_CHECKPOINT_EVERY_STEPS": "5",
        "LORAFLEET_HOST_IDLE_SECONDS": "5",
        "LORAFLEET_STEP_TIMEOUT_SECONDS": str(STEP_TIMEOUT_S),
        "LORAFLEET_RAY_NAMESPACE": namespace,
        "RAY_ADDRESS": ray_address,  # the session's Ray: this test reaches the host in it
    }
    server = LorafleetServer(env=env, log=tmp_path / "server.log")
    server.start()
    yield server
    server.stop()
    end_pack_hosts(namespace)


def is_checkpoint(event: dict[str, Any]) -> bool:
    return bool(event["message"].startswith("Checkpoint saved at step"))


def host_report(namespace: str, host_id: str) -> dict[str, Any]:
    import ray

    actor = ray.get_actor(host_actor_name(host_id), namespace=namespace)
    return dict(ray.get(actor.poll.remote({}), timeout=60))


def host_exists(namespace: str, host_id: str) -> bool:
    import ray

    try:
        ray.get_actor(host_actor_name(host_id), namespace=namespace)
    except ValueError:
        return False
    return True


def test_a_hung_host_is_ended_and_its_job_resumes_on_a_new_host(
    hung_server: LorafleetServer,
) -> None:
    server = hung_server
    stopped: list[int] = []
    try:
        with server.client() as client:
            file_id = upload(client, DATA)
            job = submit(
                client,
                model="tiny-llama",
                training_file=file_id,
                seed=3,
                hyperparameters={"n_epochs": 6, "batch_size": 2},  # 72 steps
                resources={"num_workers": 2},
            )

            def checkpointed() -> bool:
                return any(map(is_checkpoint, server.all_events(client, job["id"])))

            wait_for_condition(checkpointed, timeout=400, interval=0.5, what="a checkpoint")
            first = started(server, client, job["id"])
            hung_host = first["run_id"]
            assert first["attempt"] == 1

            # Hang the host's workers (only the pids of the host this test started).
            stopped = list(host_report(server.namespace, hung_host)["worker_pids"])
            assert len(stopped) == 2
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            hung_at = time.monotonic()

            def moved_on() -> bool:
                return started(server, client, job["id"])["attempt"] == 2

            wait_for_condition(moved_on, timeout=STEP_TIMEOUT_S + 120, what="the requeue")
            assert time.monotonic() - hung_at >= STEP_TIMEOUT_S * 0.5
            # The hung host was ended (its actor gone), not left holding its resources.
            wait_for_condition(
                lambda: not host_exists(server.namespace, hung_host),
                timeout=60,
                what="the hung host to end",
            )

            done = server.wait_until_terminal(client, job["id"])
            assert done["status"] == "succeeded", done
            events = server.all_events(client, job["id"])
            second = started(server, client, job["id"])
            assert second["attempt"] == 2 and second["run_id"] != hung_host
            requeued = [e for e in events if e["message"].startswith("Run lost")]
            assert len(requeued) == 1 and "made no step" in requeued[0]["message"]

            # Attempt 2 resumed from attempt 1's newest checkpoint, not from step 0. That may
            # be newer than the last one announced before the hang: a checkpoint can be
            # complete in the store while its event is still on the stopped worker.
            at = events.index(next(e for e in events if e is requeued[0]))
            saved = [e["data"]["step"] for e in events[:at] if is_checkpoint(e)]
            joined = [e["data"] for e in events[at:] if "resumed_from_step" in (e["data"] or {})]
            resumed_from = joined[0]["resumed_from_step"]
            resumed = [e["data"]["step"] for e in events[at:] if e["type"] == "metrics"]
            assert saved and resumed_from is not None and resumed_from >= max(saved), (
                saved,
                joined,
            )
            assert resumed[0] == resumed_from + 1, (resumed_from, resumed[:3])
            assert resumed[-1] == 72
        # The stopped workers were killed with their host.
        wait_for_condition(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in stopped),
            timeout=60,
            what="the hung workers to end",
        )
        # Every CPU free again once the new host idles out: the hung host's placement group
        # was removed with it (Ray leaves a killed owner's group reserved otherwise).
        import ray

        wait_for_condition(
            lambda: ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"],
            timeout=120,
            what="the hosts' placement groups to be released",
        )
    finally:
        for pid in stopped:  # whatever is left of what this test stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
