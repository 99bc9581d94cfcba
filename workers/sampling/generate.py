"""The sampling loop (pure torch, no Ray): one prompt, n sequences, token by token through a
causal LM with its KV cache.

Each sampled token's logprob is log_softmax of the model's raw logits at that position, in
fp32: what a forward pass over prompt + tokens gives (temperature and top_p change which
token is drawn, not the logprob reported). Temperature 0 is greedy (argmax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

STOP, LENGTH = "stop", "length"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or less): no limit
    seed: int | None = None
    stop_tokens: frozenset[int] = field(default_factory=frozenset)  # kept in the output


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # STOP (a stop token or string) or LENGTH (max_tokens)


def pick(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    top_k: int = 0,
) -> int:
    """The next token from one position's logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k likeliest tokens (top_k > 0) and
    to the smallest top set of mass >= top_p."""
    if temperature == 0:
        return int(torch.argmax(logits))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass strictly above each token
        ordered[before >= top_p] = 0.0  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    params: SamplingParams,
    n: int = 1,
    stops_at: Callable[[list[int]], bool] | None = None,
) -> list[SampledSequence]:
    """n sequences after `prompt`. `stops_at(tokens)`: whether the tokens so far end with
    something that stops the sequence (a stop string), checked after each token."""
    if not prompt:
        raise ValueError("prompt: at least one token is needed")
    generator = torch.Generator().manual_seed(
        params.seed if params.seed is not None else int(torch.seed() % 2**63)
    )
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    first = model(input_ids=ids, use_cache=True)  # the prompt once, shared by the n sequences
    out = []
    for _ in range(n):
        logits, past = first.logits[0, -1].float(), _copy_cache(first.cache, n)
        tokens: list[int] = []
        logprobs: list[float] = []
        finish = LENGTH
        while len(tokens) < params.max_tokens:
            token = pick(logits, params.temperature, params.top_p, generator, params.top_k)
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
            if token in params.stop_tokens or (stops_at is not None and stops_at(tokens)):
                finish = STOP
                break
            if len(tokens) == params.max_tokens:
                break
            step = model(
                input_ids=torch.tensor([[token]], device=device),
                cache=past,
                use_cache=True,
            )
            logits, past = step.logits[0, -1].float(), step.cache
        out.append(SampledSequence(tokens, logprobs, finish))
    return out


def _copy_cache(cache: object, n: int) -> object:
    """Each sequence extends the prompt's KV cache in place (transformers' DynamicCache):
    the last one may take it, the others a copy."""
    import copy

    return copy.deepcopy(cache) if n > 1 else cache
