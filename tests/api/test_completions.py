"""/v1/completions and /v1/chat/completions through the official `openai` SDK (issue 21),
with the scheduler's part played in this process: a real Sampler answers the `sample` rows
as the dispatcher's sampler actor would (tests/e2e/test_completions_over_http.py runs it on
Ray). Greedy text on a fine-tuned model is a local peft `generate`'s, and not the base's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI

from orchestrator.settings import Settings
from tests.api.samplers import samples_answered
from tests.api.test_merged_weights import peft_adapter, succeeded_job

PROMPT = "The quick brown"


@pytest.fixture()
def sampler_thread(client: TestClient, settings: Settings, tiny_base: Path) -> Iterator[None]:
    with samples_answered(settings, tiny_base):
        yield


def local_greedy(
    base: Path, adapter: Path | None, prompt: str, tokens: int
) -> tuple[str, list[float]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        logprobs = torch.log_softmax(model(out).logits[0].float(), dim=-1)
    new = out[0, ids.shape[1] :].tolist()
    chosen = [float(logprobs[ids.shape[1] - 1 + i, t]) for i, t in enumerate(new)]
    return tokenizer.decode(new, skip_special_tokens=True), chosen


def test_completions_of_a_fine_tuned_model_and_the_base(
    client: TestClient, sampler_thread: None, tiny_base: Path, tmp_path: Path
) -> None:
    adapter = peft_adapter(tiny_base, tmp_path / "adapter")
    succeeded_job(client, adapter, model="ft:tiny::try")
    sdk = OpenAI(base_url="http://testserver/v1", api_key="open", http_client=client, max_retries=0)

    tuned = sdk.completions.create(
        model="ft:tiny::try", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0
    )
    base = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    text, logprobs = local_greedy(tiny_base, adapter, PROMPT, 8)
    assert tuned.choices[0].text == text and tuned.model == "ft:tiny::try"
    assert base.choices[0].text == local_greedy(tiny_base, None, PROMPT, 8)[0]
    assert tuned.choices[0].text != base.choices[0].text
    assert tuned.choices[0].logprobs is not None
    assert tuned.choices[0].logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert tuned.choices[0].finish_reason == "length" and tuned.object == "text_completion"
    assert tuned.usage is not None and tuned.usage.completion_tokens == 8
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + 8

    # Seeded draws repeat; n choices; a stop string cuts the text and says "stop".
    drawn = [
        sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=7, top_p=0.9)
        for _ in range(2)
    ]
    assert [c.text for c in drawn[0].choices] == [c.text for c in drawn[1].choices]
    assert len(drawn[0].choices) == 3
    cut_at = base.choices[0].text[2:4]
    stopped = sdk.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=[cut_at]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == base.choices[0].text[: base.choices[0].text.find(cut_at)]

    chat = sdk.chat.completions.create(
        model="ft:tiny::try",
        messages=[{"role": "user", "content": "hello"}],
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
    )
    prompt = "<|user|>\nhello<|end|>\n<|assistant|>\n"  # the tiny tokenizer's chat template
    assert chat.choices[0].message.content == local_greedy(tiny_base, adapter, prompt, 5)[0]
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    assert chat.choices[0].logprobs is not None and len(chat.choices[0].logprobs.content or []) == 5


def test_bad_requests_name_their_field_and_tenants_stay_apart(
    client: TestClient, tiny_base: Path, tmp_path: Path
) -> None:
    def error(body: dict[str, object], path: str = "/v1/completions") -> tuple[int, str]:
        response = client.post(path, json=body)
        return response.status_code, response.json()["error"]["param"]

    good = {"model": "tiny", "prompt": "hi"}
    assert error({**good, "model": "ft:tiny::nobody"}) == (404, "model")
    assert error({**good, "model": "ftckpt-nope-3"}) == (404, "model")
    assert error({**good, "temperature": 3}) == (400, "temperature")
    assert error({**good, "max_tokens": 0}) == (400, "max_tokens")
    assert error({**good, "stream": True}) == (400, "stream")
    assert error({**good, "prompt": ["a", "b"]}) == (400, "prompt")
    assert error({"model": "tiny", "messages": []}, "/v1/chat/completions") == (400, "messages")

    # Another tenant's fine-tuned model is a 404, as if it did not exist.
    succeeded_job(client, peft_adapter(tiny_base, tmp_path / "a"), model="ft:tiny::mine")
    keys = client.app.state.services.keys  # type: ignore[attr-defined]
    _, theirs = keys.create("globex")
    sdk = OpenAI(base_url="http://testserver/v1", api_key=theirs, http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="ft:tiny::mine", prompt="hi", max_tokens=2)
