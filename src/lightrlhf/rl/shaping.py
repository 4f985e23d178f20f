"""Per-token rewards for RLHF: a KL penalty on every token, the reward model's score at the end."""

from __future__ import annotations

import torch
from torch import Tensor


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last position with mask == 1 in each row of a [B, T] mask (0 if none)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    # position + 1 where valid, 0 elsewhere: the row max is one past the last valid index.
    return (positions * mask.bool()).max(dim=-1).values.sub(1).clamp(min=0)


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -kl_coef * kl_t on valid tokens, plus the sequence score at the last valid token.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2;
    Stiennon et al. 2020, "Learning to Summarize from Human Feedback", eq. 1.
    scores: [B]; kl, mask: [B, T]. Zero where mask == 0; a row with no valid token gets no score.
    """
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, 0)
    score = torch.where(valid.any(dim=-1), scores.to(rewards.dtype), 0)
    return rewards.scatter_add(-1, last_valid_index(mask).unsqueeze(-1), score.unsqueeze(-1))
