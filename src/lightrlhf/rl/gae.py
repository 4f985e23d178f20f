"""Generalised advantage estimation: one response per row (text), or rows of environment steps
holding several episodes (control)."""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    dones: Tensor | None = None,
    next_value: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 11-16).
    delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
    A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}     (= sum_l (gamma*lam)^l delta_{t+l}
                                                               within one episode)
    R_t = A_t + V_t
    Returns (advantages, returns), both [B, T]; positions where mask == 0 are zero.

    Rows are sequences, columns time. done_t = 1 where the episode ended at step t: the state after
    it is terminal, so V_{t+1} is not used and the recursion restarts (A_t = delta_t with next
    value 0); a row may hold several episodes (rows = environments, as cleanrl's ppo.py).
    dones: [B, T] or None (no episode ends inside the valid positions). next_value: [B], V(s_T) of
    the state after the last column, bootstrapped where the row's last step did not end its
    episode (a rollout cut by the horizon); None = 0.

    Text RLHF, the default call: the response fills the mask == 1 positions from position 0 (right
    padding) and its episode ends at its last token, so V after it is 0 (terminal, no bootstrap).
    This is the special case dones = 1 at the last valid token, next_value = 0. More generally, a
    valid position followed by padding sees V_{t+1} = 0 and A_{t+1} = 0, so next_value is only
    used by rows whose last column is valid.

    A time-limit truncation inside a row is not a true terminal: the caller adds
    gamma * V(final obs) to r_t and sets done_t = 1, the usual trick (Huang et al. 2022, "The 37
    Implementation Details of PPO", detail 5 "Generalized Advantage Estimation" on bootstrapping
    non-terminal ends). Inputs are used as constants: call under torch.no_grad() with detached
    values.
    """
    valid = mask.bool()
    # detail: padding may hold any value the model produced; it must not leak into valid positions.
    rewards = torch.where(valid, rewards, 0)
    values = torch.where(valid, values, 0)
    batch, length = rewards.shape
    advantages = torch.zeros_like(values)
    next_values = values.new_zeros(batch) if next_value is None else next_value.to(values.dtype)
    next_advantage = values.new_zeros(batch)
    for t in reversed(range(length)):
        nonterminal = 1.0 if dones is None else 1.0 - dones[:, t].to(values.dtype)
        delta = rewards[:, t] + gamma * next_values * nonterminal - values[:, t]
        # detail: zeroing at padding restarts the recursion, so a valid token followed by padding
        # sees V_{t+1} = 0 and A_{t+1} = 0: the episode is terminal there.
        next_advantage = torch.where(valid[:, t], delta + gamma * lam * nonterminal * next_advantage, 0)
        advantages[:, t] = next_advantage
        next_values = values[:, t]
    returns = torch.where(valid, advantages + values, 0)
    return advantages, returns


def bootstrap_truncations(rewards: Tensor, truncated: Tensor, final_values: Tensor, gamma: float) -> Tensor:
    """r_t + gamma * V(s_final) at the steps where a time limit cut the episode, r_t elsewhere.

    A time-limit end is not a terminal state: the return would have gone on. Passing these rewards to
    `gae` with done_t = 1 at those steps bootstraps from the value of the true final observation
    (Huang et al. 2022, "The 37 Implementation Details of PPO", detail 5; Pardo et al. 2018, "Time
    Limits in Reinforcement Learning"). rewards, truncated (0/1 or bool), final_values: [B, T];
    final_values is read only where truncated.
    """
    return rewards + gamma * torch.where(truncated.bool(), final_values, 0)
