"""Generalised advantage estimation for one response per row."""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 11-16).
    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = sum_l (gamma*lam)^l delta_{t+l}
    R_t = A_t + V_t
    Returns (advantages, returns), both [B, T]; positions where mask == 0 are zero.

    The response fills the mask == 1 positions from position 0 (right padding); the episode ends
    at its last token, so V after it is 0 (terminal, no bootstrap). Inputs are used as constants:
    call under torch.no_grad() with detached values.
    """
    valid = mask.bool()
    # detail: padding may hold any value the model produced; it must not leak into valid positions.
    rewards = torch.where(valid, rewards, 0)
    values = torch.where(valid, values, 0)
    batch, length = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(batch)
    next_advantage = values.new_zeros(batch)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # detail: zeroing at padding restarts the recursion, so the last valid token sees
        # V_{t+1} = 0 and A_{t+1} = 0: the episode is terminal there.
        next_advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, 0)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = torch.where(valid, advantages + values, 0)
    return advantages, returns
