"""Next-token cross entropy over a block of rows, in chunks of tokens, without an fp32 copy of
the whole vocabulary's logits.

A plain `F.cross_entropy(logits.float(), …)` upcasts every logit to fp32 and autograd keeps
that copy (and the softmax) for backward: 8 rows × 2048 tokens × 128k vocabulary × 4 B ≈
8.4 GB on a Llama-3 base. Here each chunk of tokens is upcast, reduced to a loss sum, and
recomputed in backward (activation checkpointing), so at most one chunk's fp32 logits exist
at a time. In fp32 the result equals the plain mean to rounding (~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 4096


def _chunk_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def token_chunks(
    per_chunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    flat_logits: torch.Tensor,
    flat_labels: torch.Tensor,
    chunk_tokens: int,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(its tokens, `per_chunk` of them) for each chunk of `chunk_tokens` tokens; with a
    graph, each chunk is recomputed in backward, so only one chunk's fp32 logits live."""
    for start in range(0, flat_labels.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if flat_logits.requires_grad:
            part = checkpoint(
                per_chunk, flat_logits[piece], flat_labels[piece], use_reentrant=False
            )
        else:
            part = per_chunk(flat_logits[piece], flat_labels[piece])
        yield piece, part


def chunked_next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """The mean next-token loss of `logits` [rows, seq, vocab] against `labels` [rows, seq]
    (shifted by one here), over the tokens whose label is not IGNORE_INDEX."""
    flat_logits = logits[:, :-1].flatten(0, 1)
    flat_labels = labels[:, 1:].flatten()
    counted = (flat_labels != IGNORE_INDEX).sum()
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for _, part in token_chunks(_chunk_loss_sum, flat_logits, flat_labels, chunk_tokens):
        total = total + part
    # As F.cross_entropy's mean: NaN when no token counts (that job's loss check catches it).
    return total / counted


@torch.no_grad()
def chunked_token_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens whose arg-max logit is the next token, tokens counted) over the same tokens as
    the loss, chunk by chunk: an arg-max reads the logits as they are (no fp32 copy, no
    graph), so it adds no full-vocabulary memory to the step."""
    flat_logits = logits[:, :-1].flatten(0, 1)
    flat_labels = labels[:, 1:].flatten()
    correct = flat_labels.new_zeros(())
    for start in range(0, flat_labels.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        correct += (flat_logits[piece].argmax(-1) == flat_labels[piece]).sum()
    return correct, (flat_labels != IGNORE_INDEX).sum()


@torch.no_grad()
def chunked_loss_sum_and_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """[loss summed over counted tokens, tokens predicted right, tokens counted] (fp32) of a
    forward made without gradient (evaluation): sums, so chunks and ranks add up."""
    flat_logits = logits[:, :-1].flatten(0, 1)
    flat_labels = labels[:, 1:].flatten()
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_labels.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total += _chunk_loss_sum(flat_logits[piece], flat_labels[piece])
    correct, counted = chunked_token_accuracy(logits, labels, chunk_tokens)
    return torch.stack([total, correct.float(), counted.float()])
