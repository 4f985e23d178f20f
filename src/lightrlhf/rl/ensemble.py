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
As the scorer of an online method (`reward.ensemble`), the members are standardised on the initial
policy's samples before the minimum or mean - lambda * std is taken (`standardised_aggregate`).
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


# -- an ensemble as the scorer: mean, worst case, uncertainty-weighted --------------------------------
#
# Coste et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization", ICLR 2024) optimise a
# conservative combination of K reward models: the worst case over the members (WCO) and the mean
# minus a penalty on their disagreement (UWO). Their UWO penalises the members' variance,
# mean - lambda * 1/K sum_k (r_k - mean)^2; here the penalty is the (sample) standard deviation,
# mean - lambda * std, which has the reward's units, so lambda reads as "standard deviations of
# disagreement below the mean" (a lower confidence bound) and the result can be written back in the
# reward's units. Both grow with the disagreement and leave agreeing members at their mean.
#
# Bradley-Terry fixes each member only up to its own additive constant, and members trained apart
# also differ in scale; the minimum and the std of raw member scores would partly measure those.
# So (as Coste et al. do) each member is first standardised by its own mean and std on the initial
# policy's samples, and only then aggregated.

ENSEMBLE_AGGREGATES = ("mean", "min", "uncertainty")


def member_statistics(member_scores: Tensor) -> tuple[Tensor, Tensor]:
    """[K] mean m_k and population std s_k (1/N) of each member's scores over N responses ([K, N]),
    computed in float64: the statistics that standardise the members (`standardise_members`)."""
    scores = member_scores.double()
    return scores.mean(1), scores.std(1, correction=0)


def standardise_members(member_scores: Tensor, means: Tensor, stds: Tensor, eps: float = 1e-8) -> Tensor:
    """z_k = (r_k - m_k) / (s_k + eps) for [K, N] scores and [K] statistics: each member in units of
    its own spread on the calibration responses, with its own Bradley-Terry constant removed."""
    means, stds = means.to(member_scores).unsqueeze(1), stds.to(member_scores).unsqueeze(1)
    return (member_scores - means) / (stds + eps)


def aggregate_members(member_scores: Tensor, aggregate: str, uncertainty_coef: float = 0.0) -> Tensor:
    """[N] one score per response from the members' [K, N] scores (Coste et al. 2023, sec. 3):

        mean         1/K sum_k z_k
        min          min_k z_k                                   (worst-case optimisation, WCO)
        uncertainty  mean - lambda * std_k(z_k),  lambda = uncertainty_coef
                     (uncertainty-weighted optimisation, UWO; sample std, K - 1, 0 for K = 1)
    """
    if aggregate == "mean":
        return member_scores.mean(0)
    if aggregate == "min":
        return member_scores.min(0).values
    if aggregate == "uncertainty":
        mean, std = ensemble_mean_std(member_scores)
        return mean - uncertainty_coef * std
    raise ValueError(f"unknown ensemble aggregate {aggregate!r}; one of {ENSEMBLE_AGGREGATES}")


def standardised_aggregate(member_scores: Tensor, means: Tensor, stds: Tensor, aggregate: str,
                           uncertainty_coef: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(aggregate, mean, std) [N] each of [K, N] raw member scores, aggregated on the standardised
    members z_k = (r_k - m_k) / s_k and written back in the members' average units:

        A = m_bar + s_bar * agg_k(z_k),   mean = m_bar + s_bar * mean_k(z_k),   std = s_bar * std_k(z_k)
        m_bar = 1/K sum_k m_k,   s_bar = 1/K sum_k s_k

    Why back in those units: the reward model's term then has about the size the plain mean has, so
    `reward.weight` against the Python components means the same whatever the aggregate, and
    A = mean - lambda * std holds between the three numbers the stages log. (With members of one
    scale, s_k = s, `mean` is the raw members' mean, up to rounding.)"""
    standard = standardise_members(member_scores, means, stds)
    mean_z, std_z = ensemble_mean_std(standard)
    level, scale = means.mean().to(standard), stds.mean().to(standard)
    aggregated = aggregate_members(standard, aggregate, uncertainty_coef)
    return level + scale * aggregated, level + scale * mean_z, scale * std_z
