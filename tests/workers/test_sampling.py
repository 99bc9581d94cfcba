"""The sampling loop and the sampler's adapter cache on the tiny Llama, without Ray (issue 21):
greedy tokens are the argmax of a forward pass, each token's logprob is log_softmax of that
forward's logits, and an adapter samples differently from the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.sampling.generate import LENGTH, STOP, SamplingParams, generate, pick
from workers.sampling.sampler import Sampler, chat_prompt

PROMPT = [5, 9, 42, 7, 100]


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)  # B starts at zero: make the adapter change something
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sampler(tiny_base: Path) -> Sampler:
    return Sampler(tiny_base, max_adapters=1)


def forward_logprobs(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_against_forward(model: torch.nn.Module, tokens: list[int], logprobs: list[float]) -> None:
    """Each token is the argmax of a forward over everything before it, with that logprob."""
    full = forward_logprobs(model, PROMPT + tokens)
    for i, token in enumerate(tokens):
        row = full[len(PROMPT) - 1 + i]
        assert token == int(torch.argmax(row))
        assert logprobs[i] == pytest.approx(float(row[token]), abs=1e-4)


def test_greedy_is_the_argmax_of_a_forward_with_its_logprobs(sampler: Sampler) -> None:
    [seq] = generate(sampler.base, PROMPT, SamplingParams(max_tokens=8, temperature=0))
    assert len(seq.tokens) == 8 and seq.finish_reason == LENGTH
    check_against_forward(sampler.base, seq.tokens, seq.logprobs)


def test_seeded_draws_repeat_and_logprobs_are_the_forwards(sampler: Sampler) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.5, seed=3)
    first = generate(sampler.base, PROMPT, params, n=3)
    again = generate(sampler.base, PROMPT, params, n=3)
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert len({tuple(s.tokens) for s in first}) > 1  # n draws, not one repeated
    for seq in first:
        full = forward_logprobs(sampler.base, PROMPT + seq.tokens)
        expected = [float(full[len(PROMPT) - 1 + i, t]) for i, t in enumerate(seq.tokens)]
        assert seq.logprobs == pytest.approx(expected, abs=1e-4)


def test_top_p_keeps_the_top_token_only_when_it_holds_the_mass() -> None:
    logits = torch.tensor([3.0, 1.0, 0.5, -2.0])
    generator = torch.Generator().manual_seed(0)
    assert {pick(logits, 1.0, 0.5, generator) for _ in range(50)} == {0}
    assert len({pick(logits, 5.0, 1.0, generator) for _ in range(200)}) > 1
    assert {pick(logits, 50.0, 1.0, generator, top_k=2) for _ in range(200)} == {0, 1}


def test_a_stop_token_ends_the_sequence(sampler: Sampler) -> None:
    [seq] = generate(sampler.base, PROMPT, SamplingParams(max_tokens=8, temperature=0))
    stop = SamplingParams(max_tokens=8, temperature=0, stop_tokens=frozenset({seq.tokens[2]}))
    [cut] = generate(sampler.base, PROMPT, stop)
    assert (
        cut.finish_reason == STOP
        and cut.tokens == seq.tokens[: seq.tokens.index(seq.tokens[2]) + 1]
    )


def test_an_adapter_samples_its_own_model_and_the_base_stays_reachable(
    sampler: Sampler, adapter: Path, tiny_base: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_tokens=8, temperature=0)
    [base_seq] = sampler.run(None, PROMPT, params, 1)
    [tuned] = sampler.run(str(adapter), PROMPT, params, 1)
    assert tuned.tokens != base_seq.tokens
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter
    )
    check_against_forward(reference, tuned.tokens, tuned.logprobs)
    # The base, again, with the adapter cached (disabled, not dropped).
    [base_again] = sampler.run(None, PROMPT, params, 1)
    assert base_again.tokens == base_seq.tokens


def test_the_cache_drops_the_least_recently_used_adapter(
    sampler: Sampler, adapter: Path, tmp_path: Path
) -> None:
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(adapter, twin)
    params = SamplingParams(max_tokens=4, temperature=0)
    [one] = sampler.run(str(adapter), PROMPT, params, 1)
    [two] = sampler.run(str(twin), PROMPT, params, 1)  # max_adapters=1: the first goes
    assert len(sampler.adapters) == 1 and one.tokens == two.tokens
    [back] = sampler.run(str(adapter), PROMPT, params, 1)  # loaded again
    assert back.tokens == one.tokens and len(sampler.adapters) == 1


def test_requests_as_the_dispatcher_sends_them(sampler: Sampler) -> None:
    answer = sampler.sample(
        {"prompt": "The quick brown", "max_tokens": 5, "temperature": 0, "n": 2, "stop": []}
    )
    assert answer["prompt_tokens"] > 0 and len(answer["choices"]) == 2
    assert answer["choices"][0] == answer["choices"][1]  # greedy: both alike
    too_long = sampler.sample({"prompt": "x", "max_tokens": 10**6, "n": 1})
    assert too_long["param"] == "max_tokens"
    unknown = sampler.sample({"prompt_tokens": [1, 10**6], "max_tokens": 2, "n": 1})
    assert unknown["param"] == "prompt"
    messages = [{"role": "user", "content": "hello"}]
    assert chat_prompt(sampler.tokenizer, messages).endswith("<|assistant|>\n")  # its template

    class Plain:
        chat_template = None

    assert chat_prompt(Plain(), messages) == "user: hello\nassistant:"


def test_released_adapters_leave_the_cache_and_the_base_samples_as_before(
    tiny_base: Path, adapter: Path, tmp_path: Path
) -> None:
    import shutil

    sampler = Sampler(tiny_base, max_adapters=4)
    twin = tmp_path / "twin"
    shutil.copytree(adapter, twin)
    params = SamplingParams(max_tokens=4, temperature=0)
    [base_seq] = sampler.run(None, PROMPT, params, 1)
    [tuned] = sampler.run(str(adapter), PROMPT, params, 1)
    sampler.run(str(twin), PROMPT, params, 1)
    # The active adapter goes first; the other stays cached and samples as it did.
    assert sampler.release([str(twin), str(tmp_path / "never-loaded")]) == 1
    assert len(sampler.adapters) == 1
    assert sampler.run(str(adapter), PROMPT, params, 1)[0].tokens == tuned.tokens
    assert sampler.release([str(adapter)]) == 1  # the last: the bare base again
    assert sampler.adapters == {} and sampler.model is sampler.base
    assert not any("lora" in name for name, _ in sampler.base.named_modules())
    assert sampler.run(None, PROMPT, params, 1)[0].tokens == base_seq.tokens
    assert sampler.run(str(twin), PROMPT, params, 1)[0].tokens == tuned.tokens  # reloads
