"""Reward shaping for RLHF: the shaped sequence score, and per-token rewards (a KL penalty on every
token, the shaped score at the last one)."""

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


def shape_scores(normalized: Tensor, ended_with_eos: Tensor, clip: float | None, missing_eos_penalty: float) -> Tensor:
    """s = clip(z, -c, c) - p * [response did not end with EOS],  z the normalised score.

    The penalty comes after the clip so that it always bites: subtracted first, a response scoring
    above c + p would be clipped back to c and lose nothing for never ending (truncation is what
    the penalty exists to discourage; Huang et al. 2024, "The N+ Implementation Details of RLHF
    with PPO", on TRL's missing_eos_penalty). normalized, ended_with_eos: [B]. Returns [B].
    """
    shaped = normalized if clip is None else normalized.clamp(-clip, clip)
    return shaped - missing_eos_penalty * (~ended_with_eos.bool()).to(shaped.dtype)
