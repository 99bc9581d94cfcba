"""The chunked next-token loss equals the plain one (value and gradient), whatever the chunk
size, and never holds an fp32 copy of all logits for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.training.chunked_loss import IGNORE_INDEX, chunked_next_token_loss


def plain(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return logits, labels


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, 4096])
def test_chunked_loss_and_gradient_equal_the_plain_ones(chunk_tokens: int) -> None:
    logits, labels = batch(torch.float32)
    expected = plain(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = chunked_next_token_loss(logits, labels, chunk_tokens)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    assert torch.allclose(grad, expected_grad, atol=1e-7, rtol=0)


def test_only_one_chunk_is_upcast_at_a_time_for_backward() -> None:
    """Saved tensors for backward: bf16 logits (shared) only, no fp32 [tokens, vocab] copy."""
    logits, labels = batch(torch.bfloat16)
    saved_fp32: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.float32 and tensor.dim() == 2:
            saved_fp32.append(tensor.shape[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_next_token_loss(logits, labels, chunk_tokens=7)
    assert saved_fp32 == [], "fp32 logits were kept for backward"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain(logits, labels)
    assert saved_fp32, "the check itself sees the plain loss's fp32 copy"
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
