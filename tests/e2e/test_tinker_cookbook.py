"""tinker-cookbook's own loops against a real `lorafleet serve`, offline (issue 21): its
supervised recipe (`recipes/sl_loop.py`) and its RL recipe (`recipes/rl_loop.py`, with
`loss_fn="importance_sampling"`) run unchanged but for their config on the tiny Llama.

What a user prepares offline, and so does this test:
- the base in lorafleet's catalog under the Hugging Face name the cookbook knows (its renderer
  choice reads `model_info` by name): here `meta-llama/Llama-3.2-1B` → the tiny Llama's
  folder, whose recommended renderer (`role_colon`) works with any tokenizer;
- that name's tokenizer, registered with the cookbook (`register_tokenizer`; without it
  `get_tokenizer` asks the Hugging Face hub, or its cache, for the name);
- the recipes' data sets as local files: they call `datasets.load_dataset` with a hub name,
  which here loads a JSON file of the same columns instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env, tinker_key

# A later stage of make test: a serve with a warm host, then both recipes (~60 s here).
pytestmark = [pytest.mark.slow, pytest.mark.long]

BASE = "meta-llama/Llama-3.2-1B"  # the cookbook's name for a base with the role_colon renderer
SL_STEPS = 12
RL_STEPS = 3


@pytest.fixture(scope="module")
def cookbook_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[tuple[LorafleetServer, str]]:
    if not os.environ.get("CI"):  # make install puts it in; CI must run this, never skip
        pytest.importorskip("tinker_cookbook", reason="pip install --no-deps tinker-cookbook")
    folder = tmp_path_factory.mktemp("cookbook-server")
    env = shared_ray_env(
        folder,
        tiny_base,
        ray_address,
        base_models=json.dumps({BASE: str(tiny_base)}),
        warm_hosts="1",
        default_num_workers="1",
    )
    key = tinker_key(env)
    with running_server(env, folder, api_key=key) as server:
        yield server, key


def local_datasets(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    """The recipes' `datasets.load_dataset(hub_name, …)` load the local JSON file of that
    name instead (the same columns)."""
    import datasets

    original = datasets.load_dataset

    def load_dataset(path: str, *args: Any, **kwargs: Any) -> Any:
        local = files[path]
        return original("json", data_files={"train": str(local)}, cache_dir=str(local.parent))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metrics_of(log_path: Path) -> list[dict[str, Any]]:
    lines = (log_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_cookbooks_sl_and_rl_loops_run_offline(
    cookbook_server: tuple[LorafleetServer, str],
    tiny_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tinker
    from tinker_cookbook.recipes import rl_loop, sl_loop
    from tinker_cookbook.tokenizer_utils import register_tokenizer
    from transformers import AutoTokenizer

    server, key = cookbook_server
    monkeypatch.setenv("TINKER_API_KEY", key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    register_tokenizer(BASE, lambda: AutoTokenizer.from_pretrained(tiny_base))

    # --- supervised: a chat set whose answers follow one pattern (learnable) ---
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus zero?"},
                {"role": "assistant", "content": f"{i} plus zero is {i}."},
            ]
        }
        for i in range(4 * SL_STEPS)
    ]
    problems = [{"question": f"Count to {i}.", "answer": f"#### {i}"} for i in range(2 * RL_STEPS)]
    local_datasets(
        monkeypatch,
        {
            "HuggingFaceH4/no_robots": jsonl(tmp_path / "no_robots.jsonl", chats),
            "openai/gsm8k": jsonl(tmp_path / "gsm8k.jsonl", problems),
        },
    )
    sl_log = tmp_path / "sl"
    sl_loop.main(
        sl_loop.Config(
            base_url=server.url,
            log_path=str(sl_log),
            model_name=BASE,
            batch_size=4,
            learning_rate=1e-2,
            max_length=128,
            lora_rank=8,
            save_every=0,
            ttl_seconds=None,
        )
    )
    sl = [m for m in metrics_of(sl_log) if "train_mean_nll" in m]
    assert len(sl) == SL_STEPS
    nll = [m["train_mean_nll"] for m in sl]
    assert all(math.isfinite(x) for x in nll), nll
    assert sum(nll[-3:]) < 0.8 * sum(nll[:3]), nll
    saved = [json.loads(line) for line in (sl_log / "checkpoints.jsonl").read_text().splitlines()]
    assert saved[-1]["name"] == "final" and saved[-1]["state_path"].startswith("tinker://")

    # --- RL: GRPO-style groups, importance_sampling, a reward the tiny model can earn ---
    # The recipe grades \boxed{} answers, which a random tiny model never writes: every
    # group would be all-zero advantages and skipped. A reward that varies between samples
    # (answers near 12 characters) keeps each group's advantages non-zero.
    monkeypatch.setattr(rl_loop, "get_reward", lambda response, answer: -abs(len(response) - 12))
    losses: list[tuple[str, Any]] = []
    forward_backward = tinker.TrainingClient.forward_backward

    def observed(self: Any, data: Any, loss_fn: str, *args: Any, **kwargs: Any) -> Any:
        future = forward_backward(self, data, loss_fn, *args, **kwargs)
        losses.append((loss_fn, future))
        return future

    monkeypatch.setattr(tinker.TrainingClient, "forward_backward", observed)
    rl_log = tmp_path / "rl"
    rl_loop.main(
        rl_loop.Config(
            base_url=server.url,
            log_path=str(rl_log),
            model_name=BASE,
            batch_size=2,
            group_size=4,
            learning_rate=1e-3,
            lora_rank=8,
            save_every=0,
            max_tokens=8,
            loss_fn="importance_sampling",
            ttl_seconds=None,
        )
    )
    rl = metrics_of(rl_log)
    assert [m["progress/batch"] for m in rl] == list(range(RL_STEPS))
    assert all(math.isfinite(m["reward/total"]) for m in rl), rl
    assert len(losses) == RL_STEPS  # every batch trained: no group had all-equal rewards
    for loss_fn, future in losses:
        result = future.result()
        assert loss_fn == "importance_sampling"
        assert math.isfinite(result.metrics["loss:sum"]), result.metrics
        for output in result.loss_fn_outputs:
            assert all(math.isfinite(x) for x in output["logprobs"].tolist())
    assert os.path.exists(rl_log / "checkpoints.jsonl")
