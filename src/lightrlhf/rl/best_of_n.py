"""Best-of-n sampling: its KL to the base policy, and unbiased estimates from N >= n draws.

Best-of-n draws n responses from the base policy pi_0 and keeps the one the reward ranks highest.

KL. With a reward that has no ties, the best-of-n policy's KL to pi_0 is (Stiennon et al. 2020,
"Learning to summarize from human feedback", appendix G.3)

    KL(pi_bon || pi_0) = log n - (n - 1) / n

and Beirami et al. 2024 ("Theoretical guarantees on the best-of-n alignment policy") show it is an
upper bound in general (ties and a discrete response space only lower it).

Estimation. Sampling n responses for each n separately wastes draws and makes the curve over n
noisy. Instead, draw N >= n responses of one prompt once, sort them by reward ascending, and average
over every n-subset of them: the i-th (1-based) is the best of a uniformly random n-subset with
probability

    w_i = C(i - 1, n - 1) / C(N, n)          (the other n - 1 members lie among the i - 1 below it)

so sum_i w_i g(y_i) is the exact mean of g(best of S) over all C(N, n) subsets S -- an unbiased
estimate of E[g(best of n draws)] for any function g of the response (reward, gold score, length).
n = 1 gives the plain mean, n = N the g of the top-ranked draw.

Ties. Best-of-n breaks a tie in reward uniformly at random. A run of m equal rewards with a below
it is then chosen with probability [C(a + m, n) - C(a, n)] / C(N, n), shared equally by its m
members -- the same as averaging w_i over the tied ranks a + 1 .. a + m (hockey-stick identity).

Monotone in n, exactly. A uniformly random n-subset of a uniformly random (n+1)-subset is a uniformly
random n-subset, and the best of the larger set scores at least as high as the best of its subset,
so the estimated mean reward of the chosen response never decreases with n -- for every prompt, not
only in expectation (up to float rounding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; an upper bound, Beirami et al. 2024)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def _comb_ratio_table(size: int, n: int) -> Tensor:
    """C(k, n) / C(size, n) for k = 0 .. size, in float64.

    The ratio, not C(k, n) itself: C(257, 128) is ~6e75 and C(1025, 512) overflows float64, while the
    ratio lies in [0, 1]. Python divides the exact integers with one correct rounding."""
    whole = math.comb(size, n)
    return torch.tensor([math.comb(k, n) / whole for k in range(size + 1)], dtype=torch.float64)


def _chosen_probability(below: Tensor, equal: Tensor, total: int, n: int) -> Tensor:
    """P(a response is the best of a uniformly random n-subset of `total`), ties broken uniformly:
    [C(below + equal, n) - C(below, n)] / (equal * C(total, n)); `equal` counts the response itself."""
    table = _comb_ratio_table(total, n)
    return (table[below + equal] - table[below]) / equal.to(torch.float64)


def best_of_n_weights(rewards: Tensor, n: int) -> Tensor:
    """[..., N] rewards -> [..., N] float64 w_i: the probability that draw i is the best of a uniformly
    random n-subset of the N draws (ties: uniformly random). Each row sums to 1."""
    total = rewards.shape[-1]
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}] (the number of draws), got {n}")
    below = (rewards.unsqueeze(-2) < rewards.unsqueeze(-1)).sum(-1)  # [..., i]: draws ranked under i
    equal = (rewards.unsqueeze(-2) == rewards.unsqueeze(-1)).sum(-1)  # [..., i]: draws tied with i, itself included
    return _chosen_probability(below, equal, total, n)


def best_of_n_mean(rewards: Tensor, values: Tensor, n: int) -> Tensor:
    """[..., N] rewards and values g(y_i) -> [...] the unbiased estimate sum_i w_i g(y_i) of
    E[g(best of n draws)] (see module docstring)."""
    return (best_of_n_weights(rewards, n) * values.to(torch.float64)).sum(-1)


def best_of_n_win_rate(rewards: Tensor, gold: Tensor, n: int) -> Tensor:
    """[..., N] rewards (what best-of-n ranks by) and gold scores -> [...] the probability that the
    best of n draws has a higher gold score than one further, independent draw (a tie counts 1/2).

    Unbiased from N >= n + 1 draws: for each draw j as the opponent, the best of a uniformly random
    n-subset of the other N - 1 draws (weights as `best_of_n_weights` over those N - 1), averaged
    over j. For n = 1 it is exactly 1/2."""
    total = rewards.shape[-1]
    if not 1 <= n <= total - 1:
        raise ValueError(f"n must be in [1, {total - 1}] (one draw fewer than the {total} draws), got {n}")
    r_i, r_j = rewards.unsqueeze(-2), rewards.unsqueeze(-1)  # [..., j, i]
    below = (rewards.unsqueeze(-2) < rewards.unsqueeze(-1)).sum(-1).unsqueeze(-2)  # [..., 1, i] over all N
    equal = (rewards.unsqueeze(-2) == rewards.unsqueeze(-1)).sum(-1).unsqueeze(-2)
    # detail: leaving draw j out moves i down one rank when j ranked below i, or shrinks i's tie when equal
    itself = torch.eye(total, dtype=torch.bool)  # i = j: not among the others (any in-range counts; zeroed)
    below_without_j = torch.where(itself, 0, below - (r_j < r_i).long())
    equal_without_j = torch.where(itself, 1, equal - (r_j == r_i).long())
    weights = _chosen_probability(below_without_j, equal_without_j, total - 1, n).masked_fill(itself, 0.0)
    g_i, g_j = gold.unsqueeze(-2).to(torch.float64), gold.unsqueeze(-1).to(torch.float64)
    wins = (g_i > g_j).to(torch.float64) + 0.5 * (g_i == g_j).to(torch.float64)
    return (weights * wins).sum(-1).mean(-1)
