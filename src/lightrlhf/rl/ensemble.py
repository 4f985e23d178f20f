"""Reward-model ensembles: how the members are made to differ, and what their spread says.

K reward models r_1 .. r_K are trained on one frozen base, each on its own bootstrap resample of the
preference pairs and from its own random initialisation (Lakshminarayanan et al. 2017, "Simple and
Scalable Predictive Uncertainty Estimation using Deep Ensembles"; Osband et al. 2016, bootstrapped
DQN). Where the data pins a reward down, they agree; where it does not, they disagree, and the
spread is an estimate of the reward model's own (epistemic) uncertainty -- the signal active
selection asks about (Christiano et al. 2017, sec. 2.2.4; Lee et al. 2021, B-Pref).

    mean(x, y) = 1/K sum_k r_k(x, y)
    std(x, y)  = sqrt( 1/(K-1) sum_k (r_k(x, y) - mean(x, y))^2 )          (0 for K = 1)

Bradley-Terry learns rewards only up to a constant per member (P(a > b) depends on r(a) - r(b)), so
a raw std across members would partly measure those constants. `align_offsets` removes them; the
pair scores of rl/selection.py use only differences within a prompt, where they cancel anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bootstrap_weights(members: int, size: int, seed: int) -> Tensor:
    """[members, size] Poisson(1) counts: how often each of `size` pairs is in each member's resample.

    The count of one item in a bootstrap resample of n from n is Binomial(n, 1/n) -> Poisson(1) as n
    grows (the online bootstrap of Oza & Russell 2001): each pair gets its own count per member,
    fixed by (seed, member, pair), so a member sees the same resample in every epoch and after a
    resume, and needs no pass over the data to draw it. About e^-1 = 37% of the pairs are left out
    of each member's resample, as in the ordinary bootstrap.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.ones(members, size), generator=generator)


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """[K] per member sum_i w_ki v_ki / sum_i w_ki over a batch ([K, B] each); 0 for a member whose
    resample holds none of the batch's pairs (it then takes no gradient from this batch)."""
    total = weights.sum(-1)
    return (weights * values).sum(-1) / total.clamp(min=1e-12) * (total > 0)


def ensemble_mean_std(member_scores: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) over the members (dim 0) of [K, ...] scores; the std is the sample std (K - 1 in
    the denominator) and 0 for a single member."""
    mean = member_scores.mean(0)
    if member_scores.shape[0] < 2:
        return mean, torch.zeros_like(mean)
    return mean, member_scores.std(0, correction=1)


def align_offsets(member_means: Tensor) -> Tensor:
    """[K] what to subtract from each member's rewards so that all have the ensemble's mean level:
    offset_k = m_k - 1/K sum_j m_j, where m_k is member k's mean reward on a common set of responses.
    The ensemble mean is unchanged (the offsets sum to 0); the std then measures disagreement about
    the responses, not the constants Bradley-Terry leaves free."""
    return member_means - member_means.mean()
