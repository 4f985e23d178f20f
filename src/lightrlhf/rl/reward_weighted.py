"""Reward-weighted fine-tuning: which sampled responses to imitate, and how much.

Every method here samples k responses per prompt from the current policy, scores them, and then
minimises a *weighted* negative log-likelihood of the samples,

    L = sum_i w_i * NLL_i / Z,      NLL_i = -sum_t m_it * log pi(y_it | x_i, y_i,<t)

where the methods differ only in the weights w_i (one per response):

    RAFT       w_i = 1 for the best of its prompt's k responses (optionally only if its reward
               is >= a quantile of the batch's rewards), else 0.
               Dong et al. 2023, "RAFT: Reward rAnked FineTuning", Algorithm 1.
    ReST       w_i = 1 if r_i >= tau_j, else 0, with thresholds tau_1 <= tau_2 <= ... rising over the
               Improve steps of one Grow set (here: quantiles of the Grow set's rewards).
               Gulcehre et al. 2023, "Reinforced Self-Training (ReST)", sec. 2 and Algorithm 1.
    RWR        w_i = softmax(r / tau)_i, over the batch or over each prompt's k responses.
               Peters & Schaal 2007, "Reinforcement learning by reward-weighted regression".
    REINFORCE  w_i = A_i = r_i - 1/(k-1) sum_{j != i} r_j  (a leave-one-out baseline: unbiased, since it
               does not depend on y_i). Williams 1992; the baseline as in Kool et al. 2019 and
               Ahmadian et al. 2024 ("Back to Basics", eq. 5). Minimising A_i * NLL_i is gradient
               ascent on E[A log pi] = the policy gradient.
    naive      w_i = +1 if r_i > threshold else -1, no baseline: the literal `loss * reward`. Its loss
               is unbounded below: the -1 samples' NLL can grow without limit (push their probability
               to 0), which lowers the loss forever without making anything better.

Shapes: rewards come in as [prompts, k] (row p holds prompt p's k responses; a rollout's flat [N]
rows p*k .. p*k + k - 1 are `rewards.view(-1, k)`), weights and masks come out as [prompts, k].
`weighted_sequence_nll` takes the flat [N, T] token log-probs and an [N] (or [prompts, k]) weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

RWRNormalization = Literal["batch", "prompt"]
NLLNormalizer = Literal["weighted_tokens", "tokens", "sequences"]


def _check_grouped(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, k]; got shape {tuple(rewards.shape)}")


def best_per_prompt_mask(rewards: Tensor) -> Tensor:
    """[prompts, k] rewards -> [prompts, k] bool, True at each prompt's highest reward (RAFT's pick).

    Exactly one True per row; among equal rewards the first (lowest index) wins, so the choice is
    deterministic given the samples (they are i.i.d., so the first of a tie is as good as a random one).
    """
    _check_grouped(rewards)
    best = rewards.argmax(dim=1, keepdim=True)  # torch.argmax returns the first maximal index
    return torch.zeros_like(rewards, dtype=torch.bool).scatter_(1, best, True)


def reward_quantile(rewards: Tensor, quantile: float) -> Tensor:
    """The `quantile` (in [0, 1]) of all rewards in the batch, linear interpolation between order
    statistics (numpy's default: position q * (n - 1) of the sorted rewards). Returns a scalar."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return torch.quantile(rewards.detach().reshape(-1).to(torch.float64), quantile).to(rewards.dtype)


def raft_mask(rewards: Tensor, quantile: float | None = None) -> Tensor:
    """RAFT's selection: the best response of each prompt, and with `quantile` set only those bests whose
    reward is >= that quantile of the whole batch's rewards (so a prompt whose k samples are all poor
    contributes nothing). [prompts, k] -> [prompts, k] bool, at most one True per row."""
    mask = best_per_prompt_mask(rewards)
    if quantile is not None:
        mask = mask & (rewards >= reward_quantile(rewards, quantile))
    return mask


def rest_thresholds(rewards: Tensor, quantiles: Sequence[float]) -> Tensor:
    """ReST's rising thresholds for the Improve steps of one Grow set: tau_j = quantile_j of the Grow set's
    rewards (all prompts, all k). The quantiles must not decrease (each Improve step filters harder).
    Returns [len(quantiles)]."""
    if not quantiles:
        raise ValueError("ReST needs at least one Improve quantile")
    if any(b < a for a, b in zip(quantiles, quantiles[1:])):
        raise ValueError(f"ReST quantiles must not decrease, got {list(quantiles)}")
    return torch.stack([reward_quantile(rewards, q) for q in quantiles])


def above_threshold_mask(rewards: Tensor, threshold: float | Tensor) -> Tensor:
    """r_i >= threshold, elementwise (ReST's filter for one Improve step). Any shape in, bool out."""
    return rewards >= threshold


def rwr_weights(rewards: Tensor, temperature: float, normalization: RWRNormalization = "batch") -> Tensor:
    """Reward-weighted regression weights w_i proportional to exp(r_i / tau), scaled to mean 1.

    normalization="batch":  w = N * softmax(r / tau) over all N = prompts * k responses.
    normalization="prompt": w = k * softmax(r / tau) within each prompt's k responses, so every prompt
                            carries the same total weight (its reward scale does not let it dominate).
    Mean 1 puts sum_i w_i NLL_i / N on the scale of the plain NLL; tau -> inf gives every w_i = 1 (SFT on
    the samples), tau -> 0 puts all the weight on the best (RAFT over the batch or per prompt).
    [prompts, k] -> [prompts, k]; no gradient flows through the weights.
    """
    _check_grouped(rewards)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = rewards.detach() / temperature
    if normalization == "batch":
        return torch.softmax(scaled.reshape(-1), dim=0).view_as(rewards) * rewards.numel()
    if normalization == "prompt":
        return torch.softmax(scaled, dim=1) * rewards.shape[1]
    raise ValueError(f"normalization must be 'batch' or 'prompt', got {normalization!r}")


def effective_sample_size(weights: Tensor) -> Tensor:
    """Kish's effective sample size (sum w)^2 / sum w^2 of non-negative weights (any shape): N when all
    are equal, 1 when one holds all the weight. 0 when every weight is 0."""
    total, squares = weights.sum(), (weights ** 2).sum()
    return torch.where(squares > 0, total ** 2 / squares.clamp(min=torch.finfo(weights.dtype).tiny), 0)


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE's advantages with the leave-one-out baseline b_i = (sum_j r_j - r_i) / (k - 1).
    A_i = r_i - b_i = k / (k - 1) * (r_i - mean_j r_j). [prompts, k] -> [prompts, k]; k >= 2."""
    _check_grouped(rewards)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs k >= 2 responses per prompt, got k={k}")
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return (rewards - baseline).detach()


def naive_sign_rewards(rewards: Tensor, threshold: float | Tensor) -> Tensor:
    """The seed's +-1 reward: +1 where r_i > threshold, else -1 (a tie counts as a failure). Any shape."""
    return torch.where(rewards > threshold, 1.0, -1.0).to(rewards.dtype)


def sequence_nll(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """NLL_i = -sum_t m_it log pi(y_it): [N, T] -> [N]. Padding may hold anything (inf, nan)."""
    return -torch.where(mask.bool(), token_logprobs, 0).sum(dim=-1)


def weighted_sequence_nll(token_logprobs: Tensor, mask: Tensor, weights: Tensor,
                          normalizer: NLLNormalizer = "weighted_tokens") -> Tensor:
    """L = sum_i w_i NLL_i / Z, the loss of every method above (w from the functions of this module).

    token_logprobs: [N, T] log pi of the sampled tokens (with gradient); mask: [N, T] 1 on the tokens
    that count (the response, or the masked positions of a masked LM); weights: [N] or [prompts, k]
    (flattened; detached: weights are targets, not parameters). Z:
      "weighted_tokens": sum_i w_i n_i (n_i = valid tokens of row i; needs w >= 0). With 0/1 weights this
                         is exactly the SFT token-mean NLL over the kept rows (RAFT, ReST); with RWR
                         weights a weighted token mean.
      "tokens":          sum_i n_i over all rows, a constant of the batch: used when weights have
                         either sign (REINFORCE, naive), where a weighted count could be 0 or negative.
      "sequences":       N: the mean over responses of w_i NLL_i (the textbook REINFORCE form).
    Returns a scalar; 0 when Z is 0 (nothing kept), still attached to the graph.
    """
    weights = weights.detach().reshape(-1).to(token_logprobs.dtype)
    if weights.shape[0] != token_logprobs.shape[0]:
        raise ValueError(f"{weights.shape[0]} weights for {token_logprobs.shape[0]} sequences")
    nll = sequence_nll(token_logprobs, mask)
    lengths = mask.bool().sum(dim=-1).to(token_logprobs.dtype)
    if normalizer == "weighted_tokens":
        if (weights < 0).any():
            raise ValueError("normalizer 'weighted_tokens' needs non-negative weights; use 'tokens'")
        denominator = (weights * lengths).sum()
    elif normalizer == "tokens":
        denominator = lengths.sum()
    elif normalizer == "sequences":
        denominator = torch.tensor(float(weights.shape[0]), dtype=token_logprobs.dtype)
    else:
        raise ValueError(f"normalizer must be 'weighted_tokens', 'tokens' or 'sequences', got {normalizer!r}")
    return (weights * nll).sum() / denominator.clamp(min=torch.finfo(token_logprobs.dtype).tiny)
