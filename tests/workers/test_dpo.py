"""DPO's pieces without Ray: the preference format, its tokenized pairs, the sigmoid loss and
rewards against a hand-written torch reference, and the reference pass (rows routed to
NO_ADAPTER, or to a frozen reference slot) against a plain transformers load of the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.examples import DatasetError, parse_jsonl
from workers.data.tokenization import IGNORE_INDEX, collate, tokenize_example
from workers.host.objective import (
    Preference,
    add_reference_slot,
    reference_logprobs,
    reference_slot_name,
)
from workers.lora.packed_layer import (
    NO_ADAPTER,
    Routing,
    SlotConfig,
    load_slot_state,
    matching_linear_layers,
    slot_state_dict,
    wrap_linear_layers,
)
from workers.training.preference_loss import dpo_loss, sequence_logprobs


def pair(prompt: str, chosen: str, rejected: str) -> dict[str, object]:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}], "tools": []},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def jsonl(*records: object) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def test_a_preference_line_is_the_prompt_with_each_completion() -> None:
    [example] = parse_jsonl(jsonl(pair("hi", "HELLO", "go away")))
    assert example.format == "preference"
    assert [(s.role, s.text, s.trained) for s in example.segments] == [
        ("user", "hi", False),
        ("assistant", "HELLO", True),
    ]
    assert example.rejected is not None
    assert [(s.text, s.trained) for s in example.rejected] == [("hi", False), ("go away", True)]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({**pair("a", "b", "c"), "input": "a"}, "line 1: input: must be an object"),
        ({**pair("a", "b", "c"), "input": {"messages": []}}, "line 1: input.messages: must be"),
        (
            {**pair("a", "b", "c"), "preferred_output": []},
            "line 1: preferred_output: must be a list of one assistant message",
        ),
        (
            {**pair("a", "b", "c"), "non_preferred_output": [{"role": "user", "content": "x"}]},
            "line 1: non_preferred_output[0].role: must be assistant",
        ),
        (
            {**pair("a", "b", "c"), "non_preferred_output": [{"role": "assistant", "content": ""}]},
            "line 1: non_preferred_output[0].content: must not be empty",
        ),
        (
            {**pair("a", "b", "c"), "input": {"messages": [{"role": "user"}]}},
            "line 1: input.messages[0].content: is missing",
        ),
        ({**pair("a", "b", "c"), "input": {"messages": [], "tools": 3}}, "input.messages"),
    ],
)
def test_bad_preference_lines_name_their_field(record: dict[str, object], expected: str) -> None:
    with pytest.raises(DatasetError) as raised:
        parse_jsonl(jsonl(record))
    assert expected in str(raised.value)


def test_a_file_mixing_preference_and_chat_lines_is_refused() -> None:
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DatasetError, match="line 2: line: is chat but line 1 is preference"):
        parse_jsonl(jsonl(pair("a", "b", "c"), chat))


def test_a_pair_tokenizes_to_two_rows_trained_only_on_their_completions(
    tiny_base: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    [example] = parse_jsonl(jsonl(pair("say hi", "HELLO", "no")))
    tokenized = tokenize_example(example, tokenizer, 128)
    chosen, rejected = tokenized.rows
    assert rejected is tokenized.rejected and tokenized.trainable
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say hi"}], tokenize=False, add_generation_prompt=True
    )
    n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # + BOS
    for row, text in ((chosen, "HELLO"), (rejected, "no")):
        assert row.input_ids[:n_prompt] == chosen.input_ids[:n_prompt]  # the same prompt
        assert set(row.labels[:n_prompt]) == {IGNORE_INDEX}
        trained = [t for t in row.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained).startswith(text)


def hand_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, token by token: sum of log_softmax at the next token, where it counts."""
    sums = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, row_labels.shape[0]):
            if row_labels[t] != IGNORE_INDEX:
                total = total + row_logits[t - 1].double().log_softmax(-1)[row_labels[t]]
        sums.append(total)
    return torch.stack(sums)


def test_loss_and_rewards_equal_a_hand_written_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    pairs, width, vocab, beta = 3, 9, 17, 0.3
    logits = torch.randn(2 * pairs, width, vocab, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (2 * pairs, width), generator=generator)
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    reference = torch.randn(2 * pairs, generator=generator, dtype=torch.float64) - 20

    policy = sequence_logprobs(logits, labels, chunk_tokens=5)  # chunks cut across rows
    expected = hand_logprobs(logits.detach(), labels)
    torch.testing.assert_close(policy.double(), expected, rtol=0, atol=1e-5)

    loss, stats = Preference(beta=beta).loss(logits, labels, reference.float(), chunk_tokens=5)
    chosen = beta * (expected[:pairs] - reference[:pairs])
    rejected = beta * (expected[pairs:] - reference[pairs:])
    hand_loss = torch.stack(
        [-torch.log(1 / (1 + torch.exp(-(c - r)))) for c, r in zip(chosen, rejected, strict=True)]
    ).mean()
    assert loss.item() == pytest.approx(hand_loss.item(), abs=1e-5)
    assert stats.tolist() == pytest.approx(
        [
            chosen.mean().item(),
            rejected.mean().item(),
            (chosen > rejected).double().mean().item(),
            (chosen - rejected).mean().item(),
        ],
        abs=1e-5,
    )
    # The gradient is the loss's own (through the chunked, checkpointed log-probs).
    (grad,) = torch.autograd.grad(loss, logits)
    plain = logits.detach().clone().requires_grad_(True)
    token = F.cross_entropy(
        plain[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none"
    ).view(2 * pairs, width - 1)
    sums = -token.sum(-1)
    plain_loss, _ = dpo_loss(
        sums[:pairs], sums[pairs:], reference[:pairs].float(), reference[pairs:].float(), beta
    )
    (plain_grad,) = torch.autograd.grad(plain_loss, plain)
    torch.testing.assert_close(grad, plain_grad, rtol=0, atol=1e-6)


def test_identical_completions_have_zero_margin_and_log2_loss() -> None:
    logps = torch.tensor([-3.0, -5.0])
    loss, stats = dpo_loss(logps, logps, logps - 1, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))))
    assert stats.tolist() == pytest.approx([0.1, 0.1, 0.0, 0.0])  # equal: not "right"


def test_reference_log_probs_equal_a_plain_transformers_load_of_the_base(
    tiny_base: Path,
) -> None:
    """Rows routed to NO_ADAPTER see the base alone, however trained the job's slot beside
    them is; rows routed to a frozen reference slot see that slot's factors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    records = [pair("say hi", "HELLO", "no"), pair("count", "1 2 3", "three")]
    examples = [tokenize_example(e, tokenizer, 64) for e in parse_jsonl(jsonl(*records))]
    rows = Preference(beta=0.1).rows(examples)
    batch = collate(rows, tokenizer.pad_token_id)

    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Summed in fp32 as the step sums them (that sum against a float64 one, token by token:
    # test_loss_and_rewards_equal_a_hand_written_reference).
    expected = sequence_logprobs(logits, batch["labels"], chunk_tokens=7)

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.train()  # as in a pack's step (the slot's dropout must not touch reference rows)
    routing = Routing()
    paths = matching_linear_layers(model, "all-linear")
    layers = wrap_linear_layers(model, paths, routing)
    job = SlotConfig("job-d", r=4, alpha=8.0, dropout=0.1)
    for path in paths:
        layers[path].add_slot(job, torch.Generator().manual_seed(1), torch.device("cpu"))
        torch.nn.init.normal_(layers[path].lora_B["job-d"], std=0.5)  # a trained adapter

    routing.blocks = [(NO_ADAPTER, len(rows))]
    ours = reference_logprobs(model, batch, chunk_tokens=7)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)

    routing.blocks = [("job-d", len(rows))]
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not torch.allclose(sequence_logprobs(adapted.logits, batch["labels"]), expected)

    # From a checkpoint: a frozen copy of the start adapter, routed instead of NO_ADAPTER.
    start = slot_state_dict(model, "job-d")
    add_reference_slot([layers[p] for p in paths], job, torch.device("cpu"))
    load_slot_state(model, reference_slot_name("job-d"), start)
    model.eval()  # the job's own rows without dropout, to compare with
    with torch.no_grad():
        as_job = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    routing.blocks = [(reference_slot_name("job-d"), len(rows))]
    frozen = reference_logprobs(model, batch, chunk_tokens=7)
    torch.testing.assert_close(
        frozen, sequence_logprobs(as_job.logits, batch["labels"]), rtol=0, atol=1e-6
    )
    assert not any(
        layer.lora_A[reference_slot_name("job-d")].requires_grad for layer in layers.values()
    )
