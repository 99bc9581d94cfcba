"""Examples to token ids and loss labels, with the base model's own tokenizer.

Labels are -100 (ignored by the loss) on every token the model is not trained to produce:
prompts, user and system turns, chat-template headers (unless the job sets
`train_on_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from core.examples import Example, Segment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    # A preference pair's non-preferred side (this example being the preferred one).
    rejected: TokenizedExample | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def rows(self) -> tuple[TokenizedExample, ...]:
        """What it puts through the base: itself, and a pair's non-preferred side."""
        return (self,) if self.rejected is None else (self, self.rejected)

    @property
    def trainable(self) -> bool:
        """Every row keeps a trained token within the sequence length."""
        return all(row.trained_tokens > 0 for row in self.rows)


def _chat_pieces(segments: tuple[Segment, ...], tokenizer: Any) -> list[tuple[str, bool]]:
    """Renders a chat with the tokenizer's template, split into (text, trained) pieces.

    Each message's text is the difference between the rendered conversation up to it and
    up to the one before; an assistant turn's header (the generation prompt) is context.
    """
    messages = [{"role": s.role, "content": s.text} for s in segments]
    if not getattr(tokenizer, "chat_template", None):
        return [(f"{s.role}: {s.text}\n", s.trained) for s in segments]

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0 and not generation_prompt:
            return ""
        text: str = tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for i, segment in enumerate(segments):
        if segment.trained:
            header = render(i, generation_prompt=True)
            if header.startswith(rendered):
                pieces.append((header[len(rendered) :], False))
                rendered = header
        full = render(i + 1)
        if not full.startswith(rendered):
            raise ValueError(
                "the tokenizer's chat template does not render conversations as prefixes"
            )
        pieces.append((full[len(rendered) :], segment.trained))
        rendered = full
    return pieces


def tokenize_example(
    example: Example, tokenizer: Any, max_seq_len: int, train_on_inputs: bool = False
) -> TokenizedExample:
    """`train_on_inputs` (the job setting): every token but BOS has a label, prompts and
    user turns too; otherwise only what the model is trained to write. A preference pair
    is two chats (the prompt and each completion)."""
    if example.rejected is not None:
        chosen = tokenize_example(
            Example("chat", example.segments), tokenizer, max_seq_len, train_on_inputs
        )
        rejected = tokenize_example(
            Example("chat", example.rejected), tokenizer, max_seq_len, train_on_inputs
        )
        return replace(chosen, rejected=rejected)
    if example.format == "chat":
        pieces = _chat_pieces(example.segments, tokenizer)
    else:
        pieces = [(s.text, s.trained) for s in example.segments]
    if train_on_inputs:
        pieces = [(text, True) for text, _ in pieces]
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trained in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    if tokenizer.eos_token_id is not None:
        # Teach the model to stop after what it was trained to write.
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if pieces and pieces[-1][1] else IGNORE_INDEX)
    return TokenizedExample(input_ids[:max_seq_len], labels[:max_seq_len])


def collate(
    batch: list[TokenizedExample], pad_token_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pads a micro-batch to `width` (default: its longest row); padding is masked out
    of attention and loss. The width changes bf16 numerics, so packing fixes it per job."""
    longest = max(len(example.input_ids) for example in batch)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"cannot pad rows of {longest} tokens to width {width}")
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
