"""A pack host actor whose own process is SIGSTOPped, on real Ray (a stalled node looks the
same to the scheduler): its polls go unanswered, so its job gets one warning and waits; the
other host's job keeps stepping and a new job is validated and started meanwhile (every tick
completes); after `LORAFLEET_MAX_RUN_POLL_TIMEOUTS` poll timeouts the stopped host is ended
and its job resumes on another host and succeeds."""

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
from tests.e2e.test_hung_host import host_exists, is_checkpoint
from tests.e2e.test_training_job import DATA, started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.faults]

POLL_TIMEOUT_S = 2
MISSED_POLLS = 15  # 30 s of silence before the host is ended: time to see the rest go on


@pytest.fixture()
def server(tmp_path: Path, tiny_base: Path, ray_address: str) -> Iterator[LorafleetServer]:
    namespace = f"stopped-{os.getpid()}-{int(time.time())}"
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny-llama": str(tiny_base)}),
        "LORAFLEET_SCHEDULER_POLL_SECONDS": "0.2",
        "LORAFLEET_CHECKPOINT_EVERY_STEPS": "5",
        "LORAFLEET_HOST_IDLE_SECONDS": "5",
        "LORAFLEET_MAX_CONCURRENT_RUNS": "4",
        "LORAFLEET_RUN_POLL_TIMEOUT_SECONDS": str(POLL_TIMEOUT_S),
        "LORAFLEET_MAX_RUN_POLL_TIMEOUTS": str(MISSED_POLLS),
        "LORAFLEET_RAY_NAMESPACE": namespace,
        "RAY_ADDRESS": ray_address,
    }
    server = LorafleetServer(env=env, log=tmp_path / "server.log")
    server.start()
    yield server
    server.stop()
    end_pack_hosts(namespace)


def actor_pid(namespace: str, host_id: str) -> int:
    """The pid of the host actor's own process, asked of the actor itself."""
    import ray

    actor = ray.get_actor(host_actor_name(host_id), namespace=namespace)
    pid: int = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    return pid


def steps_after(events: list[dict[str, Any]], moment: float) -> list[int]:
    return [
        e["data"]["step"] for e in events if e["type"] == "metrics" and e["data"]["time"] > moment
    ]


def test_a_stopped_host_actor_costs_only_its_own_job(server: LorafleetServer) -> None:
    stopped: int | None = None
    try:
        with server.client() as client:
            file_id = upload(client, DATA)
            one_worker = {"num_workers": 1}
            # Two shapes (fp32, bf16), so the two jobs train on two hosts.
            victim = submit(
                client,
                model="tiny-llama",
                training_file=file_id,
                hyperparameters={"n_epochs": 10, "batch_size": 2},  # 120 steps
                resources=one_worker,
                training={"precision": "fp32"},
            )["id"]
            bystander = submit(
                client,
                model="tiny-llama",
                training_file=file_id,
                hyperparameters={"n_epochs": 60, "batch_size": 2},  # 720 steps
                resources=one_worker,
                training={"precision": "bf16"},
            )["id"]

            def checkpointed() -> bool:
                return any(map(is_checkpoint, server.all_events(client, victim)))

            wait_for_condition(checkpointed, timeout=400, interval=0.5, what="a checkpoint")
            wait_for_condition(
                lambda: bool(steps_after(server.all_events(client, bystander), 0)),
                timeout=400,
                what="the bystander's first step",
            )
            silent_host = started(server, client, victim)["run_id"]
            assert started(server, client, bystander)["run_id"] != silent_host

            stopped = actor_pid(server.namespace, silent_host)
            assert stopped != os.getpid()
            os.kill(stopped, signal.SIGSTOP)
            stopped_at = time.time()

            # Every tick completes: a new job is validated and joins the bystander's host,
            # and the bystander keeps stepping, while the victim's host is still silent.
            newcomer = submit(
                client,
                model="tiny-llama",
                training_file=file_id,
                hyperparameters={"n_epochs": 1, "batch_size": 2},
                resources=one_worker,
                training={"precision": "bf16"},
            )["id"]
            wait_for_condition(
                lambda: bool(steps_after(server.all_events(client, newcomer), stopped_at)),
                timeout=120,
                what="the new job's first step",
            )
            first_step_after = time.time() - stopped_at
            still_waiting = client.get(f"/v1/fine_tuning/jobs/{victim}").json()
            assert still_waiting["status"] == "running"
            assert started(server, client, victim)["attempt"] == 1  # not requeued yet
            assert host_exists(server.namespace, silent_host)
            assert len(steps_after(server.all_events(client, bystander), stopped_at)) >= 2
            warnings = [
                e for e in server.all_events(client, victim) if "did not answer" in e["message"]
            ]
            assert len(warnings) == 1 and warnings[0]["level"] == "warn"

            # Then the silent host is ended and the victim resumes elsewhere.
            wait_for_condition(
                lambda: started(server, client, victim)["attempt"] == 2,
                timeout=POLL_TIMEOUT_S * MISSED_POLLS + 120,
                what="the victim's requeue",
            )
            # Figures for the reader (-s), not assertions: wall-clock varies by machine.
            print(
                f"stopped host: new job's first step {first_step_after:.1f} s after the "
                f"SIGSTOP; victim restarted {time.time() - stopped_at:.1f} s after it"
            )
            assert started(server, client, victim)["run_id"] != silent_host
            for job_id in (victim, bystander, newcomer):
                done = server.wait_until_terminal(client, job_id, timeout=600)
                assert done["status"] == "succeeded", done
            events = server.all_events(client, victim)
            lost = [e["message"] for e in events if e["message"].startswith("Run lost")]
            assert len(lost) == 1 and "did not answer" in lost[0] and "in a row" in lost[0]
            assert len([e for e in events if "did not answer within" in e["message"]]) == 1
            assert started(server, client, bystander)["attempt"] == 1  # never requeued
        assert not host_exists(server.namespace, silent_host)
        wait_for_condition(
            lambda: not Path(f"/proc/{stopped}").exists(),
            timeout=60,
            what="the stopped host actor's process to end",
        )
    finally:
        if stopped is not None:  # only the process this test stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)
