"""DPO's sigmoid loss on preference pairs, from summed completion log-probs (pure torch).

    reward(completion) = beta · (log π(completion | prompt) − log π_ref(completion | prompt))
    loss               = −log σ(reward(preferred) − reward(non-preferred))     (mean over pairs)

Log-probs are summed over a row's counted tokens (labels not IGNORE_INDEX: the completion),
chunk by chunk as the supervised loss is (workers/training/chunked_loss.py), so no fp32 copy
of the whole vocabulary's logits is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.training.chunked_loss import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, token_chunks

# The order of `dpo_loss`'s statistics (means over the pairs), as a job's metrics name them.
REWARD_METRICS = (
    "train_rewards_chosen",
    "train_rewards_rejected",
    "train_reward_accuracy",
    "train_reward_margin",
)


def _chunk_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # 0 where the label is ignored.
    return -F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """[rows]: each row's summed log-probability of its counted tokens, `logits` [rows, seq,
    vocab] predicting `labels` [rows, seq] shifted by one (fp32)."""
    flat_logits = logits[:, :-1].flatten(0, 1)
    shifted = labels[:, 1:]
    rows, width = shifted.shape
    flat_labels = shifted.flatten()
    row_of = torch.arange(rows, device=labels.device).repeat_interleave(width)
    total = flat_logits.new_zeros((rows,), dtype=torch.float32)
    chunks = token_chunks(_chunk_token_logprobs, flat_logits, flat_labels, chunk_tokens)
    for piece, part in chunks:
        total = total.index_add(0, row_of[piece], part)
    return total


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean sigmoid DPO loss, [rewards chosen, rewards rejected, reward accuracy, reward
    margin] as means over the pairs, without gradient). Each argument is [pairs]."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        stats = torch.stack(
            [
                chosen.mean(),
                rejected.mean(),
                (chosen > rejected).float().mean(),
                (chosen - rejected).mean(),
            ]
        )
    return loss, stats
