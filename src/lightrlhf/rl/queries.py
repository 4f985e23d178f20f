"""Which clip pairs to ask a teacher about, and how many at a time (preference-based RL).

A reward-model ensemble of K members predicts a return R_k(c) for every candidate clip c (the sum of
its per-step rewards). Selection scores, higher = ask first:

- random: no score; pairs are asked in the order they were drawn.
- disagreement: the spread of the members' answers to the question itself, the standard deviation
  over k of P_k(a > b) = sigmoid(R_k(a) - R_k(b)) (Christiano et al. 2017, sec. 2.2.4; B-Pref's
  "disagreement" sampling, Lee et al. 2021). A probability is unchanged when a member adds a constant
  to every return, so members that differ only by such an offset (which Bradley-Terry cannot see)
  agree.
- ucb: optimism in the face of uncertainty (Auer et al. 2002): each clip's upper confidence bound
  u(c) = mean_k z_k(c) + kappa * std_k z_k(c), where z_k is member k's returns standardised over the
  candidate clips (removing each member's own offset and scale), and a pair scores u(a) + u(b). It
  asks about pairs of clips that may both be among the best -- where the policy is heading and the
  ranking matters most -- and favours those the ensemble is unsure of.
"""

from __future__ import annotations

import torch
from torch import Tensor

SELECTIONS = ("random", "disagreement", "ucb")


def disagreement_scores(returns_a: Tensor, returns_b: Tensor) -> Tensor:
    """std_k sigmoid(R_k(a) - R_k(b)) (population std over members). returns_a, returns_b: [K, P]
    member returns of the two clips of P pairs. Returns [P]; 0 with a single member."""
    probs = torch.sigmoid(returns_a - returns_b)
    return probs.std(dim=0, unbiased=False)


def ucb_scores(clip_returns: Tensor, pairs: Tensor, kappa: float) -> Tensor:
    """u(a) + u(b) with u(c) = mean_k z_k(c) + kappa * std_k z_k(c) (module docstring).

    clip_returns: [K, C] member returns of C candidate clips; pairs: [P, 2] long indices into the clips.
    z_k = (R_k - mean_c R_k) / std_c R_k (population std over the C clips; a member whose returns are
    all equal gives z = 0). Returns [P].
    """
    mean = clip_returns.mean(dim=1, keepdim=True)
    std = clip_returns.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 0, (clip_returns - mean) / torch.where(std > 0, std, 1), 0)
    upper = z.mean(dim=0) + kappa * z.std(dim=0, unbiased=False)
    return upper[pairs[:, 0]] + upper[pairs[:, 1]]


def query_schedule(total: int, rounds: int, decay: float) -> list[int]:
    """Queries per round: n_r proportional to 1 / (1 + decay * r), r = 0 .. rounds - 1, in integers that
    add up to `total` exactly (largest remainders, ties to the earlier round).

    Early rounds ask more: the reward model knows nothing yet and the policy changes fastest (the
    decaying label rate of Christiano et al. 2017, appendix A: rate proportional to 5e6 / (T + 5e6)).
    decay = 0 spreads the budget evenly.
    """
    if total < 0 or rounds < 1 or decay < 0:
        raise ValueError(f"need total >= 0, rounds >= 1, decay >= 0; got {total}, {rounds}, {decay}")
    weights = [1.0 / (1.0 + decay * r) for r in range(rounds)]
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(rounds), key=lambda r: (-(shares[r] - counts[r]), r))
    for r in by_remainder[: total - sum(counts)]:
        counts[r] += 1
    return counts


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two [N] vectors; 0 when either is constant (nothing to correlate)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return torch.where(denominator > 0, (x * y).sum() / torch.where(denominator > 0, denominator, 1), 0).float()
