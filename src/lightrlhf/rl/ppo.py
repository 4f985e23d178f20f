"""PPO's clipped policy and value losses, and the explained variance of the value head.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7; value clipping as in
OpenAI baselines ppo2 (Huang et al. 2022, "The 37 Implementation Details of PPO", detail 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightrlhf.rl.masked import masked_mean, masked_var
from lightrlhf.validation import one_of

Aggregation = Literal["token_mean", "seq_mean"]


@dataclass
class PolicyLossResult:
    loss: Tensor
    clipfrac: Tensor
    approxkl: Tensor
    ratio_mean: Tensor


@dataclass
class ValueLossResult:
    loss: Tensor
    clipfrac: Tensor


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: Aggregation) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token_mean: sum over all valid tokens / their count. Every token weighs the same, so a long
      response pulls the update in proportion to its length.
    seq_mean: mean over sequences of each sequence's token mean (GRPO's 1/|o_i|). Every response
      weighs the same, so a token of a short response weighs more than one of a long response;
      with a negative advantage a long response is penalised less per token, which Liu et al. 2025
      ("Understanding R1-Zero-Like Training", Dr. GRPO) show makes wrong answers grow longer.
      Rows with no valid token are left out of the mean over sequences.
    """
    one_of("aggregation", aggregation, ("token_mean", "seq_mean"))
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    return masked_mean(masked_mean(per_token, mask, dim=-1), mask.bool().any(dim=-1))


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregation: Aggregation = "token_mean",
) -> PolicyLossResult:
    """L = agg( max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)) ),
    rho_t = exp(logp - old_logp).

    The max of the two negated objectives is the pessimistic bound of eq. 7. Gradient flows only
    through logp. Diagnostics (no gradient), over valid tokens:
      clipfrac: fraction of tokens where the clipped term is the active one (strictly larger);
      approxkl: 0.5 * mean((logp - old_logp)^2), the k2 estimate of KL(old || new) (Schulman's
        blog, see rl/kl.py) that TRL's PPOTrainer logs as policy/approxkl_avg;
      ratio_mean: mean of rho_t, ~1 on the first epoch over a rollout.
    """
    valid = mask.bool()
    # detail: zero the log-ratio at padding before exp, so garbage logits there can neither
    # overflow nor send a nan gradient through the `where` of the mean.
    log_ratio = torch.where(valid, logp - old_logp.detach(), 0)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossResult(loss=loss, clipfrac=clipfrac, approxkl=approxkl, ratio_mean=ratio_mean)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregation: Aggregation = "token_mean",
) -> ValueLossResult:
    """L = 0.5 * agg( max((V - R)^2, (V_clip - R)^2) ),  V_clip = V_old + clip(V - V_old, -c, c).

    Like the policy ratio, the value may move at most c from the rollout's estimate before its
    gradient is cut. clipfrac: fraction of valid tokens where the clipped term is strictly larger.
    """
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * _aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return ValueLossResult(loss=loss, clipfrac=clipfrac)


@torch.no_grad()
def explained_variance(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[targets - predictions] / Var[targets] over valid tokens (val/vf_explained_var).

    1 is a perfect value head, 0 one no better than predicting the mean, < 0 worse than that.
    When Var[targets] == 0 (constant returns, one valid token, or none) there is nothing to
    explain: the result is 0, not NaN or inf, so logged curves and their averages stay finite.
    """
    var_targets = masked_var(targets, mask, unbiased=False)
    var_residual = masked_var(targets - predictions, mask, unbiased=False)
    has_variance = var_targets > 0
    ratio = var_residual / torch.where(has_variance, var_targets, 1)
    return torch.where(has_variance, 1 - ratio, 0)
