"""A DPO job end to end through the official `openai` SDK (issue 21): a real `lorafleet serve`,
a 2-worker pack host on Ray with the base partitioned by ZeRO-3 (so the reference pass is a
collective too). Packed with a supervised job, it equals, bit for bit, the same DPO job
trained alone after it. On pairs built so the preferred answer is learnable (the word
shouted, not said), its reward accuracy ends above 0.9; on prompts it never saw, its
downloaded adapter, loaded with peft, raises the preferred completion's log-prob over the
other's. A DPO job from its checkpoint is measured against a frozen copy of that checkpoint."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file

from core.examples import parse_jsonl
from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env
from workers.data.tokenization import collate, tokenize_example
from workers.host.objective import Preference
from workers.training.preference_loss import REWARD_METRICS, sequence_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.long]
_WORDS = "apple green light music paper ocean river stone cloud bread chair dream flame glass"
TRAIN_WORDS = (*_WORDS.split(), "honey", "juice")
HELD_OUT_WORDS = ("tiger", "melon", "pilot", "sugar")
SUMS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]


def pairs(words: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"shout {w}"}]},
            "preferred_output": [{"role": "assistant", "content": w.upper()}],
            "non_preferred_output": [{"role": "assistant", "content": w}],
        }
        for w in words
    ]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[LorafleetServer]:
    folder = tmp_path_factory.mktemp("dpo-server")
    with running_server(shared_ray_env(folder, tiny_base, ray_address), folder) as server:
        yield server


def margins(tiny_base: Path, adapter: Path | None, records: list[dict[str, Any]]) -> torch.Tensor:
    """Per pair: log p(preferred) − log p(non-preferred), summed over each completion's
    tokens, under the base (adapter None) or the base with the adapter (peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    body = "\n".join(json.dumps(r) for r in records).encode()
    examples = [tokenize_example(e, tokenizer, 64) for e in parse_jsonl(body)]
    batch = collate(Preference(beta=1.0).rows(examples), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model.eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    logprobs = sequence_logprobs(logits, batch["labels"])
    return logprobs[: len(records)] - logprobs[len(records) :]


def test_a_dpo_job_through_the_openai_sdk_learns_the_preferred_answer(
    server: LorafleetServer, tiny_base: Path, tmp_path: Path
) -> None:
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key or "none", max_retries=0)
    body = "\n".join(json.dumps(r) for r in pairs(TRAIN_WORDS)).encode()
    training_file = sdk.files.create(file=("pairs.jsonl", io.BytesIO(body)), purpose="fine-tune")
    sums = "\n".join(json.dumps(r) for r in SUMS).encode()
    sums_file = sdk.files.create(file=("sums.jsonl", io.BytesIO(sums)), purpose="fine-tune")

    def dpo_job() -> Any:
        return sdk.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=training_file.id,
            seed=4,
            method={
                "type": "dpo",
                "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 5, "batch_size": 4}},
            },
            extra_body={
                "lora": {"r": 4, "alpha": 8},
                "training": {"learning_rate": 2e-2, "max_seq_len": 48},
                "resources": {"num_workers": 2},
            },
        )

    # Packed with a supervised job on one host, then the same DPO job again, alone.
    job = dpo_job()
    mate = sdk.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=sums_file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}},
        extra_body={"training": {"max_seq_len": 48}, "resources": {"num_workers": 2}},
    )
    assert job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters.beta == 0.5
    with server.client() as client:
        for one in (job, mate):
            finished = server.wait_until_terminal(client, one.id)
            assert finished["status"] == "succeeded", finished
        alone = dpo_job()
        assert server.wait_until_terminal(client, alone.id)["status"] == "succeeded"
        adapters = {}
        for one in (job, alone):
            archive = client.get(f"/v1/fine_tuning/jobs/{one.id}/adapter")
            assert archive.status_code == 200, archive.text
            with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
                tar.extractall(tmp_path / one.id, filter="data")
            [found] = (tmp_path / one.id).rglob("adapter_model.safetensors")
            adapters[one.id] = found
    config = adapters[job.id].parent / "adapter_config.json"
    packed, solo = load_file(adapters[job.id]), load_file(adapters[alone.id])
    assert packed.keys() == solo.keys() and packed
    assert all(torch.equal(packed[k], solo[k]) for k in packed), "packed differs from alone"
    pack_sizes = {
        e.data["pack_size"]
        for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)
        if e.type == "metrics" and e.data
    }
    assert 2 in pack_sizes, pack_sizes  # it did share its host's steps with the mate

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in reversed(events) if e.type == "metrics" and e.data]
    steps = [m for m in metrics if "train_reward_accuracy" in m]
    assert [m["step"] for m in steps] == list(range(1, 5 * len(TRAIN_WORDS) // 4 + 1))
    assert all(set(REWARD_METRICS) <= m.keys() for m in steps)
    first, last = steps[0], steps[-3:]
    assert first["train_reward_margin"] == pytest.approx(0.0, abs=1e-6)  # B starts at 0
    assert sum(m["train_reward_accuracy"] for m in last) / len(last) > 0.9
    assert all(m["train_rewards_chosen"] > m["train_rewards_rejected"] for m in last)
    assert last[-1]["train_loss"] < first["train_loss"]

    # From its final checkpoint: the reference is a frozen copy of that checkpoint (on both
    # ranks), not the base, so the first step's rewards are 0 though the adapter is trained.
    [final, *_] = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    forked = sdk.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 1}}},
        extra_body={"from_checkpoint": final.id, "resources": {"num_workers": 2}},
    )
    with server.client() as client:
        assert server.wait_until_terminal(client, forked.id)["status"] == "succeeded"
    forked_events = list(sdk.fine_tuning.jobs.list_events(forked.id, limit=100))
    [start] = [e.data for e in forked_events if e.data and e.data.get("step") == 1]
    assert start["train_rewards_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert start["train_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert start["train_loss"] == pytest.approx(math.log(2), abs=1e-6)

    held_out = pairs(HELD_OUT_WORDS)
    before, after = margins(tiny_base, None, held_out), margins(tiny_base, config.parent, held_out)
    print(f"\nheld-out margins before {before.tolist()} after {after.tolist()}")
    assert bool((after > before).all()), (before, after)
