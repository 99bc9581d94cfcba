from pathlib import Path

import pytest
import torch

from core.examples import parse_jsonl
from workers.data.tokenization import IGNORE_INDEX, collate, tokenize_example


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def trained_text(tokenizer, example) -> str:  # type: ignore[no-untyped-def]
    ids = [
        i
        for i, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    return tokenizer.decode(ids)


def test_chat_loss_is_only_on_assistant_turns(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = parse_jsonl(
        b'{"messages": [{"role": "user", "content": "say hi"}, '
        b'{"role": "assistant", "content": "HI THERE"}, {"role": "user", "content": "again"}, '
        b'{"role": "assistant", "content": "NO"}]}'
    )[0]
    tokens = tokenize_example(example, tokenizer, max_seq_len=512)
    text = trained_text(tokenizer, tokens)
    assert "HI THERE" in text and "NO" in text
    assert "say hi" not in text and "again" not in text and "<|assistant|>" not in text
    assert tokens.input_ids[0] == tokenizer.bos_token_id
    assert tokens.labels[-1] == tokenizer.eos_token_id  # trained to stop


def test_prompt_is_context_and_completion_is_trained(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = parse_jsonl(b'{"prompt": "3+4=", "completion": "7"}')[0]
    tokens = tokenize_example(example, tokenizer, max_seq_len=512)
    assert trained_text(tokenizer, tokens) == "7</s>"
    assert tokenizer.decode(tokens.input_ids) == "<s>3+4=7</s>"


def test_train_on_inputs_puts_the_loss_on_prompts_and_user_turns_too(tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = parse_jsonl(b'{"prompt": "3+4=", "completion": "7"}')[0]
    tokens = tokenize_example(prompt, tokenizer, max_seq_len=512, train_on_inputs=True)
    assert trained_text(tokenizer, tokens) == "3+4=7</s>"
    assert tokens.labels[0] == IGNORE_INDEX  # BOS is never predicted
    chat = parse_jsonl(
        b'{"messages": [{"role": "user", "content": "say hi"}, '
        b'{"role": "assistant", "content": "HI THERE"}]}'
    )[0]
    text = trained_text(tokenizer, tokenize_example(chat, tokenizer, 512, train_on_inputs=True))
    assert "say hi" in text and "HI THERE" in text


def test_truncation_and_padding(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long = parse_jsonl(b'{"text": "' + b"abc " * 100 + b'"}')[0]
    short = parse_jsonl(b'{"text": "a"}')[0]
    a = tokenize_example(long, tokenizer, max_seq_len=16)
    b = tokenize_example(short, tokenizer, max_seq_len=16)
    assert len(a.input_ids) == 16
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 16)
    n = len(b.input_ids)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (16 - n)
    assert torch.all(batch["labels"][1, n:] == IGNORE_INDEX)
