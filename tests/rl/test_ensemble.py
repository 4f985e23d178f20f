"""Ensemble statistics and pair-selection scores against values worked out by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl.ensemble import align_offsets, bootstrap_weights, ensemble_mean_std, weighted_mean
from lightrlhf.rl.selection import (
    disagreement_scores,
    optimistic_rewards,
    pair_index,
    pair_scores,
    select_pairs,
    ucb_scores,
)

# two members, one prompt, three responses: member 0 rates them 0, 1, 0; member 1 rates them 0, -1, 2
MEMBERS = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, -1.0, 2.0]]])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_mean_and_sample_std_over_members():
    scores = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])  # K = 3 members, 2 responses
    mean, std = ensemble_mean_std(scores)
    # response 0: 1, 3, 2 -> mean 2, squared deviations 1 + 1 + 0 = 2, / (K - 1) = 1, std 1
    # response 1: 2, 2, 5 -> mean 3, squared deviations 1 + 1 + 4 = 6, / 2 = 3, std sqrt(3)
    assert_close(mean, torch.tensor([2.0, 3.0]))
    assert_close(std, torch.tensor([1.0, math.sqrt(3)]))


def test_one_member_has_no_spread():
    mean, std = ensemble_mean_std(torch.tensor([[0.5, -1.0]]))
    assert_close(mean, torch.tensor([0.5, -1.0]))
    assert_close(std, torch.zeros(2))


def test_weighted_mean_per_member_and_an_empty_resample():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    # member 0: (1 * 1 + 2 * 3) / (1 + 2) = 7 / 3; member 1 holds none of these pairs: 0, no gradient
    out = weighted_mean(values, weights)
    assert_close(out, torch.tensor([7 / 3, 0.0]))
    grad_values = values.clone().requires_grad_(True)
    weighted_mean(grad_values, weights).sum().backward()
    assert_close(grad_values.grad[1], torch.zeros(3))


def test_bootstrap_counts_are_fixed_by_the_seed_and_differ_between_members():
    weights = bootstrap_weights(4, 20_000, seed=7)
    assert weights.shape == (4, 20_000)
    assert torch.equal(weights, bootstrap_weights(4, 20_000, seed=7))
    assert not torch.equal(weights, bootstrap_weights(4, 20_000, seed=8))
    assert torch.equal(weights, weights.round()) and weights.min() >= 0
    assert not torch.equal(weights[0], weights[1])
    # Poisson(1): mean 1, P(0) = e^-1 = 0.368 (a pair left out of a member's resample)
    assert weights.mean().item() == pytest.approx(1.0, abs=0.02)
    assert (weights == 0).float().mean().item() == pytest.approx(math.exp(-1), abs=0.01)


def test_align_offsets_keeps_the_mean_level():
    # member means 1, 2, 6: ensemble mean 3, so subtract -2, -1, 3
    assert_close(align_offsets(torch.tensor([1.0, 2.0, 6.0])), torch.tensor([-2.0, -1.0, 3.0]))


def test_pairs_are_listed_row_by_row():
    assert pair_index(3).tolist() == [[0, 0, 1], [1, 2, 2]]
    assert pair_index(4).shape == (2, 6)


def test_disagreement_is_the_spread_of_the_bradley_terry_probability():
    # member 0's differences r_i - r_j over pairs (0,1), (0,2), (1,2): -1, 0, 1; member 1's: 1, -2, -3.
    # With K = 2 the sample std of two values a, b is |a - b| / sqrt(2).
    expected = [abs(sigmoid(-1) - sigmoid(1)) / math.sqrt(2),  # 0.326766
                abs(sigmoid(0) - sigmoid(-2)) / math.sqrt(2),  # 0.269264
                abs(sigmoid(1) - sigmoid(-3)) / math.sqrt(2)]  # 0.483401
    assert_close(disagreement_scores(MEMBERS), torch.tensor([expected]), rtol=0, atol=1e-6)
    assert expected == pytest.approx([0.326766, 0.269264, 0.483401], abs=1e-6)


def test_agreeing_members_have_no_disagreement_whatever_their_constants():
    # two members that differ by a constant (Bradley-Terry cannot see it) agree on every pair
    rewards = torch.tensor([[[0.0, 1.0, 3.0]], [[5.0, 6.0, 8.0]]])
    assert_close(disagreement_scores(rewards), torch.zeros(1, 3))


def test_ucb_centres_within_the_prompt_then_adds_c_std():
    # centred: member 0: 0, 1, 0 minus 1/3 -> -1/3, 2/3, -1/3; member 1: 0, -1, 2 minus 1/3 -> -1/3, -4/3, 5/3
    # mean over members: -1/3, -1/3, 2/3; std (K = 2): 0, 2/sqrt(2), 2/sqrt(2) = 0, 1.414214, 1.414214
    # U at c = 1: -0.333333, 1.080880, 2.080880
    upper = torch.tensor([[-1 / 3, -1 / 3 + math.sqrt(2), 2 / 3 + math.sqrt(2)]])
    assert_close(optimistic_rewards(MEMBERS, 1.0), upper)
    # pairs (0,1), (0,2), (1,2): U_i + U_j = 0.747547, 1.747547, 3.161760
    assert_close(ucb_scores(MEMBERS, 1.0), torch.tensor([[0.747547, 1.747547, 3.161760]]), rtol=0, atol=1e-6)
    # c = 0: the means alone, -2/3, 1/3, 1/3
    assert_close(ucb_scores(MEMBERS, 0.0), torch.tensor([[-2 / 3, 1 / 3, 1 / 3]]))
    # a member's constant changes nothing
    shifted = MEMBERS + torch.tensor([0.0, 10.0]).view(2, 1, 1)
    assert_close(ucb_scores(shifted, 1.0), ucb_scores(MEMBERS, 1.0))


def test_random_scores_are_seeded_and_need_no_ensemble():
    first = pair_scores("random", None, 5, 4, 1.0, torch.Generator().manual_seed(3))
    again = pair_scores("random", None, 5, 4, 1.0, torch.Generator().manual_seed(3))
    assert first.shape == (5, 6) and torch.equal(first, again)
    with pytest.raises(ValueError, match="needs the ensemble"):
        pair_scores("disagreement", None, 5, 4, 1.0, torch.Generator())


SCORES = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3], [0.9, 0.95, 0.0]])


def test_select_one_pair_per_prompt_best_first():
    # each prompt offers its best pair: (0, 1) 0.9, (1, 0) 0.8, (2, 1) 0.95; the best two are chosen
    assert select_pairs(SCORES, budget=2) == [(2, 1), (0, 1)]
    assert select_pairs(SCORES, budget=10) == [(2, 1), (0, 1), (1, 0)]  # fewer offered than the budget
    assert select_pairs(SCORES, budget=0) == []


def test_select_several_per_prompt_with_ties_to_the_lower_index():
    # offers: prompt 0: 0.9 (pair 1), 0.5 (pair 2); prompt 1: 0.8, 0.3; prompt 2: 0.95, 0.9 (pair 0).
    # 0.9 is offered twice: prompt 0's goes first
    assert select_pairs(SCORES, budget=3, per_prompt=2) == [(2, 1), (0, 1), (2, 0)]


def test_select_skips_invalid_pairs():
    valid = torch.ones(3, 3, dtype=torch.bool)
    valid[2, 1] = False  # e.g. two identical answers
    valid[1] = False  # nothing to ask about this prompt
    assert select_pairs(SCORES, budget=3, valid=valid) == [(0, 1), (2, 0)]


def test_select_equal_scores_in_index_order():
    assert select_pairs(torch.zeros(2, 3), budget=4, per_prompt=2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
