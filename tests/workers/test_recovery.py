"""Worker failure, in fp32 and bf16: a Ray Train worker of this run (found through the run's
own `workers()`, never by process name: other people train on this machine) killed with
SIGKILL after a checkpoint; the run restarts its workers, the job resumes from its
checkpoint (not from step 0), and its adapter equals an uninterrupted run's bit for bit.
With no restarts left, the same kill fails the job as `infrastructure`."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from core.checkpoint_index import list_checkpoints
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, LoraSettings, TrainingSettings
from tests.workers.conftest import adapter, run, spec_for
from workers.run_actor import FAILED, SUCCEEDED

pytestmark = [pytest.mark.slow, pytest.mark.faults]

JOB = JobSpec(
    job_id="job-r",
    tenant="",
    attempt=1,
    base_model="tiny-llama",
    base_model_uri="",
    training_file_key="files/shared/data-0.jsonl",
    lora=LoraSettings(r=4, alpha=8, dropout=0.1),
    training=TrainingSettings(
        n_epochs=10, batch_size=4, max_seq_len=48, learning_rate=5e-3, seed=9
    ),
)


def kill_a_worker_of(actor: Any) -> int:
    """SIGKILLs the last rank of exactly this run (the run reports its workers)."""
    import ray

    workers = ray.get(actor.workers.remote())
    assert workers, "the run reported no worker processes"
    assert [w["rank"] for w in workers] == list(range(len(workers)))
    pid = int(workers[-1]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


# bf16, the production precision: resuming is exact there too. (fp32 resume after a kill
# is the pack host's test, tests/workers/test_pack_host.py, on the default path.)
@pytest.mark.parametrize("precision", ["bf16"])
def test_a_killed_worker_costs_only_the_steps_since_the_last_checkpoint(
    precision: str,
    ray_address: str,
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,  # noqa: F811
) -> None:
    def checkpointed(spec_tenant: str) -> Any:
        return replace(
            spec_for(
                f"recovery-{spec_tenant}-{precision}",
                [JOB],
                tiny_base,
                store_config,
                tmp_path,
                f"{spec_tenant}-{precision}",
                precision,
            ),
            checkpoint_every_steps=10,
            checkpoint_keep_last=2,
            max_worker_restarts=2,
        )

    killed: dict[str, Any] = {}

    def kill_after_first_checkpoint(
        actor: Any, states: Any, events: dict[str, list[dict[str, Any]]]
    ) -> None:
        saved = [e["data"]["step"] for e in events["job-r"] if e["type"] == "checkpoint"]
        if saved and not killed:
            killed["pid"] = kill_a_worker_of(actor)
            killed["after_step"] = saved[-1]

    interrupted = run(checkpointed("killed"), kill_after_first_checkpoint, timeout=400)
    assert interrupted["states"] == {"job-r": SUCCEEDED}
    messages = [e["message"] for e in interrupted["job-r"]]
    assert any("Workers restarted after a failure (restart 1" in m for m in messages), messages
    resumed = [
        e["data"]["resumed_from_step"]
        for e in interrupted["job-r"]
        if "resumed_from_step" in (e["data"] or {})
    ]
    assert resumed and resumed[0] >= killed["after_step"] > 0
    steps = [e["data"]["step"] for e in interrupted["job-r"] if e["type"] == "metrics"]
    assert steps.count(1) == 1, "training started over from step 0"

    uninterrupted = run(checkpointed("clean"))
    assert uninterrupted["states"] == {"job-r": SUCCEEDED}
    ours, reference = (
        adapter(store_config, f"killed-{precision}", "job-r"),
        adapter(store_config, f"clean-{precision}", "job-r"),
    )
    worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    assert worst == 0.0, f"resumed adapter differs from uninterrupted by {worst}"

    kept = list_checkpoints(open_object_store(store_config), f"killed-{precision}", "job-r")
    assert len(kept) == 2 and kept[0].step > kept[1].step


def test_a_worker_killed_with_no_restarts_left_fails_the_job_as_infrastructure(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    import ray

    spec = replace(
        spec_for("no-restarts", [JOB], tiny_base, store_config, tmp_path, "no-restarts"),
        max_worker_restarts=0,
    )
    seen: dict[str, Any] = {}

    def kill_at_the_first_step(actor: Any, states: Any, events: Any) -> None:
        if "pid" not in seen and any(e["type"] == "metrics" for e in events["job-r"]):
            seen["pid"] = kill_a_worker_of(actor)
        if states["job-r"] == FAILED and "polled" not in seen:
            seen["polled"] = ray.get(actor.poll.remote("job-r", 0))

    ended = run(spec, kill_at_the_first_step)
    assert ended["states"] == {"job-r": FAILED} and "pid" in seen
    assert seen["polled"]["error_code"] == "infrastructure", seen["polled"]["error"]
