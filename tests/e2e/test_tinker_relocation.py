"""Tinker models outlive their pack host (orchestrator.tinker.relocation), through the official
`tinker` SDK against a real serve with two warm hosts of the tiny Llama:

- drained between a client's `forward_backward` and its `optim_step`, a model moves to the
  other warm host and its client goes on with no error: its losses equal an undisturbed
  twin's, bit for bit (same factors, Adam moments and summed gradients; fp32 on CPU, the
  same operations in the same order);
- its host then killed without warning (the actor gone), the model comes back from the
  client's last `save_state`, which is still current, bit for bit again; a model whose latest
  steps no saved state holds fails instead, and its next call raises at once (a 400 with a
  body, which the SDK does not retry) naming what to load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import host_actor_name
from orchestrator.scheduling.drain import drain, hosts_seen
from orchestrator.settings import Settings
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env, tinker_key

# Two warm hosts, a drain and a kill (~60 s): the faults stage.
pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module")
def two_host_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[tuple[LorafleetServer, str]]:
    folder = tmp_path_factory.mktemp("tinker-moves")
    env = shared_ray_env(folder, tiny_base, ray_address, warm_hosts="2", default_num_workers="1")
    key = tinker_key(env)
    with running_server(env, folder, api_key=key) as server:
        yield server, key


def model_hosts(settings: Settings) -> dict[str, str | None]:
    """Model id -> its host, as the scheduler's rows have it."""
    from sqlalchemy import select

    from orchestrator.db import make_engine
    from orchestrator.tinker.rows import TinkerModelRow

    assert settings.database_url is not None
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(TinkerModelRow.id, TinkerModelRow.host_id))
            return {model_id: host_id for model_id, host_id in rows}
    finally:
        engine.dispose()


def test_a_tinker_model_moves_off_a_drained_host_and_survives_a_lost_one(
    two_host_server: tuple[LorafleetServer, str],
) -> None:
    import tinker

    server, key = two_host_server
    settings = Settings(ray_namespace=server.namespace, data_dir=server.log.parent / "state")
    wait_for_condition(
        lambda: len(hosts_seen(server.namespace)) == 2, timeout=120, what="two warm hosts"
    )
    # Closed at the end: a session left open heartbeats on after its server has gone.
    with tinker.ServiceClient(base_url=server.url, api_key=key) as service:
        moves_and_loss(service, settings, server.namespace)


def moves_and_loss(service: Any, settings: Settings, namespace: str) -> None:
    import ray
    import tinker
    from tinker import types

    tokens = list(range(5, 30))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    adam = types.AdamParams(learning_rate=1e-2)

    def client() -> Any:
        return service.create_lora_training_client(base_model="tiny-llama", rank=4, seed=0).result()

    def steps(training: Any, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            step = training.forward_backward([datum], "cross_entropy")
            training.optim_step(adam).result()
            losses.append(step.result().metrics["loss:sum"])
        return losses

    twin = client()
    expected = steps(twin, 6)

    moved = client()
    losses = steps(moved, 3)
    first = model_hosts(settings)[moved.model_id]
    assert first is not None
    # Drained with summed gradients waiting for their optim_step.
    half = moved.forward_backward([datum], "cross_entropy").result()
    assert drain(first, settings) == [first]
    moved.optim_step(adam).result()  # on the other warm host, no error
    losses += [half.metrics["loss:sum"], *steps(moved, 1)]
    second = model_hosts(settings)[moved.model_id]
    assert second not in (None, first)
    losses += steps(moved, 1)
    assert losses == expected  # bit for bit: as if it had never moved
    wait_for_condition(
        lambda: first not in {h.host_id for h in hosts_seen(namespace)},
        timeout=60,
        what="the drained host's end",
    )

    # A host lost without warning: a model whose last save_state is current comes back from
    # it; one with steps no saved state holds fails, and says so at once.
    lost = client()
    steps(lost, 1)
    moved.save_state("before-loss").result()
    expected += steps(twin, 1)
    assert second is not None
    hosts = model_hosts(settings)
    ray.kill(ray.get_actor(host_actor_name(second), namespace=namespace))
    assert steps(moved, 1) == expected[-1:]  # restored from its save on a host still up
    assert model_hosts(settings)[moved.model_id] not in (None, second)
    if hosts[lost.model_id] == second:
        # Raised at once, not retried for minutes: the future of a request in flight answers
        # the error, and a request sent after is a 400 with the same words.
        refused = (tinker.RequestFailedError, tinker.BadRequestError)
        with pytest.raises(refused) as failed:
            steps(lost, 1)
        assert "was lost with its pack host" in str(failed.value)
