"""PPO's clipped policy and value losses, the minibatch objective they make up, and the explained
variance of the value head.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 and 9; value clipping as in
OpenAI baselines ppo2 (Huang et al. 2022, "The 37 Implementation Details of PPO", detail 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightrlhf.rl.masked import masked_mean, masked_sum, masked_var
from lightrlhf.validation import one_of

Aggregation = Literal["token_mean", "seq_mean", "dr_grpo"]
AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")


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


def aggregation_normalizer(mask: Tensor, aggregation: Aggregation, max_new_tokens: int | None = None) -> Tensor:
    """The count `aggregate` divides by for this mask: its valid tokens (token_mean), its rows
    with at least one valid token (seq_mean), or rows x max_new_tokens (dr_grpo: a constant that
    does not depend on what was sampled), as a float scalar, at least 1 (so an all-padding
    batch gives a loss of 0, not NaN, as masked_mean does).

    Taken on a whole minibatch and passed as `normalizer` to each of its micro-batches, it makes
    the micro-batch losses (and their gradients) sum exactly to the minibatch's loss.
    """
    one_of("aggregation", aggregation, AGGREGATIONS)
    valid = mask.bool()
    if aggregation == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("dr_grpo divides by rows x max_new_tokens: pass max_new_tokens")
        return torch.tensor(float(max(1, mask.shape[0] * max_new_tokens)))
    count = valid.sum() if aggregation == "token_mean" else valid.any(dim=-1).sum()
    return count.clamp(min=1).float()


def aggregate(
    per_token: Tensor, mask: Tensor, aggregation: Aggregation, normalizer: float | Tensor | None = None
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token_mean: sum over all valid tokens / their count. Every token weighs the same, so a long
      response pulls the update in proportion to its length.
    seq_mean: mean over sequences of each sequence's token mean (GRPO's 1/|o_i|). Every response
      weighs the same, so a token of a short response weighs more than one of a long response;
      with a negative advantage a long response is penalised less per token, which Liu et al. 2025
      ("Understanding R1-Zero-Like Training", Dr. GRPO) show makes wrong answers grow longer.
      Rows with no valid token are left out of the mean over sequences.
    dr_grpo: sum over all valid tokens / (rows x max_new_tokens) (Liu et al. 2025, Dr. GRPO): a
      constant divisor, so every token weighs the same in every batch, whatever the lengths; the
      gradient is the unbiased policy gradient of the summed sequence objective, scaled by a
      constant. token_mean's divisor instead grows with the batch's total length, which dampens
      the tokens of a batch of long answers (a mild length dependence, through the batch); seq_mean
      is the biased one above. `normalizer` is required (aggregation_normalizer with max_new_tokens):
      the width of a rollout is its longest response, not max_new_tokens.

    normalizer: the count to divide by instead of this batch's own (valid tokens for token_mean,
    rows with a valid token for seq_mean); None = this batch's own. A micro-batch passes its
    minibatch's `aggregation_normalizer`, so that it contributes its share of the minibatch mean.
    """
    one_of("aggregation", aggregation, AGGREGATIONS)
    if aggregation == "dr_grpo":
        if normalizer is None:
            raise ValueError("dr_grpo needs normalizer = rows x max_new_tokens (aggregation_normalizer)")
        return masked_sum(per_token, mask) / normalizer
    if aggregation == "token_mean":
        if normalizer is None:
            return masked_mean(per_token, mask)
        return masked_sum(per_token, mask) / normalizer
    row_means, has_tokens = masked_mean(per_token, mask, dim=-1), mask.bool().any(dim=-1)
    if normalizer is None:
        return masked_mean(row_means, has_tokens)
    return masked_sum(row_means, has_tokens) / normalizer


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregation: Aggregation = "token_mean",
    *,
    normalizer: float | Tensor | None = None,
) -> PolicyLossResult:
    """L = agg( max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)) ),
    rho_t = exp(logp - old_logp).

    The max of the two negated objectives is the pessimistic bound of eq. 7. Gradient flows only
    through logp. `normalizer`: see `aggregate` (None = this batch's own count). Diagnostics (no
    gradient), means over this batch's valid tokens whatever the normalizer:
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
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, normalizer)
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
    *,
    normalizer: float | Tensor | None = None,
) -> ValueLossResult:
    """L = 0.5 * agg( max((V - R)^2, (V_clip - R)^2) ),  V_clip = V_old + clip(V - V_old, -c, c).

    Like the policy ratio, the value may move at most c from the rollout's estimate before its
    gradient is cut. `normalizer`: see `aggregate`. clipfrac: fraction of this batch's valid tokens
    where the clipped term is strictly larger.
    """
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, aggregation, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return ValueLossResult(loss=loss, clipfrac=clipfrac)


@dataclass
class PolicyObjective:
    objective: Tensor  # policy loss - entropy_coef * entropy, to backpropagate
    policy: PolicyLossResult
    entropy: Tensor  # aggregated entropy (same aggregation and normalizer as the loss)


@dataclass
class ValueObjective:
    objective: Tensor  # vf_coef * value loss, to backpropagate
    value: ValueLossResult


def policy_objective(
    logp: Tensor,
    entropy: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_range: float,
    entropy_coef: float,
    aggregation: Aggregation = "token_mean",
    normalizer: float | Tensor | None = None,
) -> PolicyObjective:
    """L_policy = L^CLIP - c_2 * agg(H_t): the policy half of eq. 9 with the sign of a loss.

    entropy: per-token entropy H_t [B, T] (rl/logprobs.py::entropy_from_logits); the bonus keeps
    the policy from collapsing early (Huang et al. 2022, detail 10, "Overall Loss and Entropy
    Bonus"). It is aggregated like the clipped loss, so the halves of a micro-batch share its
    minibatch's normalizer.
    """
    policy = ppo_policy_loss(logp, old_logp, advantages, mask, clip_range, aggregation, normalizer=normalizer)
    mean_entropy = aggregate(entropy, mask, aggregation, normalizer)
    return PolicyObjective(objective=policy.loss - entropy_coef * mean_entropy, policy=policy, entropy=mean_entropy)


def value_objective(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float,
    vf_coef: float,
    aggregation: Aggregation = "token_mean",
    normalizer: float | Tensor | None = None,
) -> ValueObjective:
    """L_value = c_1 * L^VF: the value half of eq. 9, with the clipped value loss."""
    value = clipped_value_loss(values, old_values, returns, mask, clip_range, aggregation, normalizer=normalizer)
    return ValueObjective(objective=vf_coef * value.loss, value=value)


def ppo_minibatch_loss(
    logp: Tensor,
    entropy: Tensor,
    values: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float,
    value_clip_range: float,
    vf_coef: float,
    entropy_coef: float,
    aggregation: Aggregation = "token_mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """L = L^CLIP + c_1 * L^VF - c_2 * agg(H_t): the total PPO loss, Schulman et al. 2017 eq. 9
    with the sign of a loss (c_1 = vf_coef, c_2 = entropy_coef).

    It is `policy_objective(...).objective + value_objective(...).objective`; a trainer whose
    policy and value are separate adapters backpropagates the two halves one after the other.
    """
    policy = policy_objective(logp, entropy, old_logp, advantages, mask, clip_range=clip_range,
                              entropy_coef=entropy_coef, aggregation=aggregation, normalizer=normalizer)
    value = value_objective(values, old_values, returns, mask, clip_range=value_clip_range, vf_coef=vf_coef,
                            aggregation=aggregation, normalizer=normalizer)
    return policy.objective + value.objective


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
