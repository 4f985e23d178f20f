import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl.best_of_n import best_of_n_kl, best_of_n_mean, best_of_n_weights, best_of_n_win_rate


def test_kl_by_hand():
    # log n - (n - 1) / n
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.6931471805599453 - 0.5, abs=1e-15)  # 0.193147
    assert best_of_n_kl(4) == pytest.approx(1.3862943611198906 - 0.75, abs=1e-15)  # 0.636294
    assert best_of_n_kl(64) == pytest.approx(4.1588830833596715 - 0.984375, abs=1e-15)  # 3.174508
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl(0)


def test_weights_by_hand():
    # rewards [1, 3, 2], n = 2: ranks ascending 1, 3, 2; C(3, 2) = 3
    #   rank 1: C(0, 1) / 3 = 0 ; rank 2: C(1, 1) / 3 = 1/3 ; rank 3: C(2, 1) / 3 = 2/3
    w = best_of_n_weights(torch.tensor([1.0, 3.0, 2.0]), 2)
    assert_close(w, torch.tensor([0.0, 2 / 3, 1 / 3], dtype=torch.float64), rtol=0, atol=1e-15)
    # E[reward of the best of 2] = 2/3 * 3 + 1/3 * 2 = 8/3 ; subsets {1,3} {1,2} {3,2} -> (3 + 2 + 3) / 3
    assert best_of_n_mean(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([1.0, 3.0, 2.0]), 2).item() == pytest.approx(8 / 3)


def test_tied_rewards_share_their_probability():
    # rewards [1, 2, 2], n = 2: subsets {1, 2a} -> 2a, {1, 2b} -> 2b, {2a, 2b} -> either, 1/2 each
    #   P(2a) = 1/3 + 1/6 = 1/2 ; formula: a = 1 below, m = 2 tied: (C(3, 2) - C(1, 2)) / (2 C(3, 2)) = 3 / 6
    w = best_of_n_weights(torch.tensor([1.0, 2.0, 2.0]), 2)
    assert_close(w, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    # all tied: every draw equally likely, whatever n
    assert_close(best_of_n_weights(torch.ones(5), 3), torch.full((5,), 0.2, dtype=torch.float64), rtol=0, atol=1e-15)


def _brute_force_mean(rewards: list[float], values: list[float], n: int) -> float:
    """Mean over every n-subset of g(its best), a tie broken uniformly at random."""
    means = []
    for subset in itertools.combinations(range(len(rewards)), n):
        top = max(rewards[i] for i in subset)
        tied = [values[i] for i in subset if rewards[i] == top]
        means.append(sum(tied) / len(tied))
    return sum(means) / len(means)


def _brute_force_win_rate(rewards: list[float], gold: list[float], n: int) -> float:
    """Mean over every opponent j and every n-subset of the others of [gold(best) > gold_j] (+ 1/2 if equal)."""
    rates = []
    for j in range(len(rewards)):
        others = [i for i in range(len(rewards)) if i != j]
        for subset in itertools.combinations(others, n):
            top = max(rewards[i] for i in subset)
            tied = [i for i in subset if rewards[i] == top]
            rates.append(sum((gold[i] > gold[j]) + 0.5 * (gold[i] == gold[j]) for i in tied) / len(tied))
    return sum(rates) / len(rates)


# rewards with ties (two 0.5s, three 2.0s), values unrelated to them
REWARDS = [0.5, 2.0, -1.0, 0.5, 3.0, 2.0, 0.0, 2.0]
VALUES = [1.0, -2.0, 0.25, 4.0, 0.5, 3.0, -1.5, 2.0]


@pytest.mark.parametrize("n", range(1, len(REWARDS) + 1))
def test_estimate_is_the_mean_over_every_subset(n):
    estimate = best_of_n_mean(torch.tensor(REWARDS), torch.tensor(VALUES), n).item()
    assert estimate == pytest.approx(_brute_force_mean(REWARDS, VALUES, n), abs=1e-12)


def test_n_1_is_the_plain_mean_and_n_N_the_value_of_the_best():
    rewards, values = torch.tensor([0.3, -1.0, 2.5, 0.7]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert best_of_n_mean(rewards, values, 1).item() == pytest.approx(2.5, abs=1e-12)  # (1 + 2 + 3 + 4) / 4
    assert best_of_n_mean(rewards, values, 4).item() == pytest.approx(3.0, abs=1e-12)  # the draw with reward 2.5


def test_rows_are_prompts():
    rewards = torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 1.0]])
    assert_close(best_of_n_mean(rewards, rewards, 2), torch.tensor([8 / 3, 2.0], dtype=torch.float64))
    assert_close(best_of_n_weights(rewards, 2).sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_mean_reward_never_decreases_with_n():
    torch.manual_seed(0)
    rewards = torch.randint(0, 6, (50, 16)).float()  # many ties
    means = [best_of_n_mean(rewards, rewards, n) for n in range(1, 17)]
    for smaller, larger in zip(means, means[1:]):
        assert (larger - smaller).min().item() >= -1e-12


def test_win_rate_by_hand():
    # rewards = gold = [1, 2, 3], n = 2: the best of the two others against the third
    #   j = 1: best of {2, 3} = 3 wins ; j = 2: best of {1, 3} = 3 wins ; j = 3: best of {1, 2} = 2 loses -> 2/3
    g = torch.tensor([1.0, 2.0, 3.0])
    assert best_of_n_win_rate(g, g, 2).item() == pytest.approx(2 / 3, abs=1e-15)
    assert best_of_n_win_rate(g, g, 1).item() == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError, match="one draw fewer"):
        best_of_n_win_rate(g, g, 3)


@pytest.mark.parametrize("n", range(1, len(REWARDS)))
def test_win_rate_is_the_mean_over_every_subset_and_opponent(n):
    gold = [0.0, 1.0, 1.0, -2.0, 0.5, 3.0, 0.0, 1.0]  # ties in gold too
    estimate = best_of_n_win_rate(torch.tensor(REWARDS), torch.tensor(gold), n).item()
    assert estimate == pytest.approx(_brute_force_win_rate(REWARDS, gold, n), abs=1e-12)


def test_win_rate_of_n_1_is_one_half_whatever_the_scores():
    torch.manual_seed(1)
    rates = best_of_n_win_rate(torch.randn(4, 9), torch.randint(0, 3, (4, 9)).float(), 1)
    assert_close(rates, torch.full((4,), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_n_out_of_range():
    with pytest.raises(ValueError, match=r"n must be in \[1, 3\]"):
        best_of_n_weights(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"n must be in \[1, 3\]"):
        best_of_n_weights(torch.zeros(3), 0)
    assert math.isfinite(best_of_n_mean(torch.zeros(3), torch.zeros(3), 3).item())


def test_a_thousand_draws_neither_overflow_nor_lose_the_weights():
    # C(1025, 512) is ~1e307 and C(1025, 600) overflows float64: the weights are ratios in [0, 1]
    rewards = torch.randn(1025, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (1, 256, 600, 1025):
        weights = best_of_n_weights(rewards, n)
        assert torch.isfinite(weights).all() and weights.sum().item() == pytest.approx(1.0, abs=1e-9)
    top = best_of_n_weights(rewards, 1025)
    assert top[rewards.argmax()].item() == 1.0  # the best of all the draws is the top draw
    # the best of 256 out of 1025: rank i from the top has weight C(1024 - i, 255) / C(1025, 256)
    order = torch.argsort(rewards, descending=True)
    weights = best_of_n_weights(rewards, 256)
    assert weights[order[0]].item() == pytest.approx(256 / 1025)
    assert weights[order[1]].item() == pytest.approx(256 / 1025 * 769 / 1024)
