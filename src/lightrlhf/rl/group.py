"""Critic-free policy gradients with group baselines: GRPO, Dr. GRPO and RLOO.

A rollout holds k responses per prompt in rows p*k .. p*k + k-1 (rollouts/rollout.py). Each
response's advantage compares its reward with the other responses to the same prompt; no value
function is learned. The advantage is one number per response, given to each of its tokens.

    GRPO      A_i = (r_i - mean_g r) / (std_g r + eps)      Shao et al. 2024, "DeepSeekMath", sec. 4.1.2
    Dr. GRPO  A_i =  r_i - mean_g r                         Liu et al. 2025, "Understanding R1-Zero-Like
                                                            Training", sec. 3.1 (no std: the std scaling
                                                            up-weights groups that are nearly all right or
                                                            all wrong, i.e. too easy or too hard prompts)
    RLOO      A_i =  r_i - 1/(k-1) sum_{j != i} r_j          Ahmadian et al. 2024, "Back to Basics", eq. 5
              (= k/(k-1) * (r_i - mean_g r): an unbiased baseline, since it excludes r_i itself)

std_g is the sample standard deviation (Bessel's 1/(k-1)), as TRL's GRPOTrainer takes it; eps keeps
a group of equal rewards (std 0) at advantage 0 instead of 0/0.

The loss (`group_policy_objective`) is PPO's clipped surrogate on the importance ratio to the
rollout policy (`num_iterations` > 1 passes reuse one rollout; on the first pass the ratio is
exactly 1), aggregated over tokens (`aggregate` in rl/ppo.py: token_mean, seq_mean or dr_grpo),
optionally with beta * KL(pi || pi_ref) in the loss, estimated by the importance-weighted k3
(rl/kl.py: `kl_k3_importance_weighted`, whose gradient is unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightrlhf.rl.kl import kl_k3_importance_weighted
from lightrlhf.rl.ppo import Aggregation, PolicyLossResult, aggregate, ppo_policy_loss
from lightrlhf.validation import one_of

Baseline = Literal["grpo", "rloo"]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """[N] -> [N / k, k], checking that every group can be compared within itself."""
    if group_size < 2:
        raise ValueError(f"group baselines need at least 2 responses per prompt, got group_size={group_size} "
                         "(a group of 1 has nothing to compare with)")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be [prompts * group_size]; got shape {tuple(rewards.shape)} for "
                         f"group_size={group_size}")
    return rewards.view(-1, group_size)


def group_mean_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps); with scale=False, Dr. GRPO's A_i = r_i - mean_g.

    rewards: [N] with N = prompts * group_size, rows of one prompt adjacent. Returns [N].
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = r_i - (sum_g r - r_i) / (k - 1). rewards: [N] as above. Returns [N]."""
    groups = _groups(rewards, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def group_advantages(rewards: Tensor, group_size: int, baseline: Baseline, scale: bool = True,
                     eps: float = 1e-4) -> Tensor:
    """The named baseline's advantages ([N] -> [N]); `scale` applies to grpo only (RLOO never scales)."""
    one_of("baseline", baseline, ("grpo", "rloo"))
    if baseline == "rloo":
        return leave_one_out_advantages(rewards, group_size)
    return group_mean_advantages(rewards, group_size, scale, eps)


@dataclass
class GroupObjective:
    objective: Tensor  # clipped surrogate + kl_coef * KL term, to backpropagate
    policy: PolicyLossResult  # the clipped surrogate alone, with its diagnostics
    kl: Tensor  # the aggregated KL term (0 when kl_coef == 0), value ~ KL(pi || pi_ref) per token


def group_policy_objective(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
                           clip_range: float, kl_coef: float = 0.0, aggregation: Aggregation = "token_mean",
                           normalizer: float | Tensor | None = None) -> GroupObjective:
    """L = agg( max(-A * rho_t, -A * clip(rho_t, 1 - eps, 1 + eps)) + beta * k3w_t ),  rho_t = pi/pi_old.

    GRPO's objective (Shao et al. 2024, eq. 3) with the sign of a loss; A: [N] per response, the same
    for every token of it. k3w_t (rl/kl.py::kl_k3_importance_weighted) is Schulman's k3 times the
    ratio rho_t, so that its gradient is that of KL(pi || pi_ref) (DeepSeekMath's plain k3 is not).
    With kl_coef == 0 the reference is not used (it may be None). logp, old_logp, ref_logp, mask: [N, T].
    """
    per_token_advantages = advantages.detach()[:, None].expand_as(logp)
    policy = ppo_policy_loss(logp, old_logp, per_token_advantages, mask, clip_range, aggregation,
                             normalizer=normalizer)
    if kl_coef == 0:
        kl = torch.zeros((), dtype=logp.dtype)
        return GroupObjective(policy.loss, policy, kl)
    if ref_logp is None:
        raise ValueError("kl_coef > 0 needs the reference's log-probs")
    valid = mask.bool()
    # detail: padding positions hold arbitrary log-probs; zero them before any exp (see ppo_policy_loss)
    kl_tokens = kl_k3_importance_weighted(torch.where(valid, logp, 0), torch.where(valid, old_logp, 0),
                                          torch.where(valid, ref_logp, 0))
    kl = aggregate(kl_tokens, mask, aggregation, normalizer)
    return GroupObjective(policy.loss + kl_coef * kl, policy, kl)


@torch.no_grad()
def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """sum_t (log pi - log pi_ref) over each response's valid tokens: k1 of the whole sequence, [N].
    Its expectation over y ~ pi is KL(pi || pi_ref) of the response distribution (the reward's KL term)."""
    return torch.where(mask.bool(), logp - ref_logp, 0).sum(dim=-1)


@torch.no_grad()
def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Mean over groups of the within-group standard deviation: 0 means no group had anything to learn."""
    return _groups(rewards, group_size).std(dim=1).mean()


@torch.no_grad()
def fraction_zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Fraction of groups whose k rewards are all equal: their advantages are 0, they teach nothing."""
    groups = _groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean()

