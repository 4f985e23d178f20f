"""Reward-weighted fine-tuning math (RAFT, ReST, RWR, REINFORCE, naive) against values by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl.reward_weighted import (
    above_threshold_mask,
    best_per_prompt_mask,
    effective_sample_size,
    leave_one_out_advantages,
    naive_sign_rewards,
    raft_mask,
    rest_thresholds,
    reward_quantile,
    rwr_weights,
    sequence_nll,
    weighted_sequence_nll,
)

# two prompts, k = 3 responses each
REWARDS = torch.tensor([[1.0, 4.0, 2.0],
                        [0.0, -1.0, 0.0]])


def test_best_per_prompt_picks_the_highest_and_the_first_of_a_tie():
    expected = torch.tensor([[False, True, False],
                             [True, False, False]])  # prompt 1: 0 at index 0 and 2, the first wins
    assert torch.equal(best_per_prompt_mask(REWARDS), expected)


def test_reward_quantile_interpolates_between_order_statistics():
    # sorted: [-1, 0, 0, 1, 2, 4]; q = 0.5 -> position 0.5 * 5 = 2.5 -> (0 + 1) / 2 = 0.5
    assert reward_quantile(REWARDS, 0.5).item() == 0.5
    # q = 0.9 -> position 4.5 -> (2 + 4) / 2 = 3
    assert_close(reward_quantile(REWARDS, 0.9), torch.tensor(3.0))
    assert reward_quantile(REWARDS, 0.0).item() == -1.0
    assert reward_quantile(REWARDS, 1.0).item() == 4.0
    with pytest.raises(ValueError, match="quantile must be in"):
        reward_quantile(REWARDS, 1.5)


def test_raft_keeps_the_best_of_each_prompt_above_the_batch_quantile():
    # no quantile: one per prompt
    assert raft_mask(REWARDS).sum(dim=1).tolist() == [1, 1]
    # quantile 0.5 = 0.5: prompt 0's best (4) stays, prompt 1's best (0) is dropped
    expected = torch.tensor([[False, True, False],
                             [False, False, False]])
    assert torch.equal(raft_mask(REWARDS, quantile=0.5), expected)


def test_rest_thresholds_rise_with_the_quantiles_and_filter():
    # sorted [-1, 0, 0, 1, 2, 4]: q 0.5 -> 0.5 ; q 0.7 -> position 3.5 -> 1.5 ; q 0.9 -> 3
    thresholds = rest_thresholds(REWARDS, [0.5, 0.7, 0.9])
    assert_close(thresholds, torch.tensor([0.5, 1.5, 3.0]))
    kept = [above_threshold_mask(REWARDS, t).sum().item() for t in thresholds]
    assert kept == [3, 2, 1]  # {1, 4, 2}, {4, 2}, {4}
    assert above_threshold_mask(REWARDS, 0.0).sum().item() == 5  # >=: the two zeros count
    with pytest.raises(ValueError, match="must not decrease"):
        rest_thresholds(REWARDS, [0.7, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        rest_thresholds(REWARDS, [])


def test_rwr_weights_over_the_batch_by_hand():
    # tau = 1: exp(r) = [e, e^4, e^2, 1, e^-1, 1], sum S ; w = 6 * exp(r) / S
    exps = [math.e, math.e ** 4, math.e ** 2, 1.0, math.exp(-1), 1.0]
    total = sum(exps)
    expected = torch.tensor([6 * x / total for x in exps]).view(2, 3)
    weights = rwr_weights(REWARDS, 1.0, "batch")
    assert_close(weights, expected)
    assert_close(weights.mean(), torch.tensor(1.0))


def test_rwr_weights_per_prompt_by_hand():
    # tau = 2, prompt 1: r/tau = [0, -0.5, 0] -> exp [1, e^-0.5, 1], w = 3 * exp / (2 + e^-0.5)
    weights = rwr_weights(REWARDS, 2.0, "prompt")
    z = 2 + math.exp(-0.5)
    assert_close(weights[1], torch.tensor([3 / z, 3 * math.exp(-0.5) / z, 3 / z]))
    # every prompt carries total weight k = 3
    assert_close(weights.sum(dim=1), torch.tensor([3.0, 3.0]))


def test_rwr_temperature_limits_and_bad_values():
    # a huge tau: uniform weights (SFT on the samples)
    assert_close(rwr_weights(REWARDS, 1e9), torch.ones(2, 3))
    # a tiny tau per prompt: all weight k on the best (RAFT); the tie in prompt 1 splits it
    assert_close(rwr_weights(REWARDS, 1e-3, "prompt"), torch.tensor([[0.0, 3.0, 0.0], [1.5, 0.0, 1.5]]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rwr_weights(REWARDS, 0.0)
    with pytest.raises(ValueError, match="normalization"):
        rwr_weights(REWARDS, 1.0, "group")


def test_effective_sample_size():
    assert effective_sample_size(torch.ones(6)).item() == 6.0
    assert effective_sample_size(torch.tensor([0.0, 6.0, 0.0])).item() == 1.0
    # [1, 3]: (1 + 3)^2 / (1 + 9) = 1.6
    assert_close(effective_sample_size(torch.tensor([1.0, 3.0])), torch.tensor(1.6))
    assert effective_sample_size(torch.zeros(3)).item() == 0.0


def test_leave_one_out_advantages_by_hand():
    # prompt 0: 1 - (4 + 2)/2 = -2 ; 4 - (1 + 2)/2 = 2.5 ; 2 - (1 + 4)/2 = -0.5
    # prompt 1: 0 - (-1 + 0)/2 = 0.5 ; -1 - 0 = -1 ; 0 - (0 - 1)/2 = 0.5
    expected = torch.tensor([[-2.0, 2.5, -0.5], [0.5, -1.0, 0.5]])
    assert_close(leave_one_out_advantages(REWARDS), expected)
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_advantages(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"\[prompts, k\]"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]))


def test_naive_sign_rewards():
    expected = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    assert torch.equal(naive_sign_rewards(REWARDS, 0.0), expected)  # 0 > 0 is false: -1
    assert naive_sign_rewards(REWARDS, 1.5).tolist() == [[-1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]


# token log-probs of 3 sequences; 99 marks padding (never read)
LOGP = torch.tensor([[-1.0, -2.0, 99.0],
                     [-0.5, 99.0, 99.0],
                     [-3.0, -1.0, -2.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])


def test_sequence_nll_ignores_padding():
    assert_close(sequence_nll(LOGP, MASK), torch.tensor([3.0, 0.5, 6.0]))
    # inf in padding does not leak
    assert torch.isfinite(sequence_nll(LOGP.masked_fill(MASK == 0, float("-inf")), MASK)).all()


def test_weighted_sequence_nll_normalizers_by_hand():
    weights = torch.tensor([1.0, 0.0, 1.0])
    # kept rows 0 and 2: (3 + 6) / (2 + 3) tokens = 1.8, exactly SFT's token mean over the kept rows
    assert_close(weighted_sequence_nll(LOGP, MASK, weights), torch.tensor(1.8))
    # weights [2, 1, -1], tokens: (2*3 + 1*0.5 - 6) / (2 + 1 + 3) = 0.5 / 6
    signed = torch.tensor([2.0, 1.0, -1.0])
    assert_close(weighted_sequence_nll(LOGP, MASK, signed, "tokens"), torch.tensor(0.5 / 6))
    # sequences: 0.5 / 3
    assert_close(weighted_sequence_nll(LOGP, MASK, signed, "sequences"), torch.tensor(0.5 / 3))
    # RWR-style positive weights [0.5, 2, 0.5]: (1.5 + 1 + 3) / (1 + 2 + 1.5) = 5.5 / 4.5
    assert_close(weighted_sequence_nll(LOGP, MASK, torch.tensor([0.5, 2.0, 0.5])), torch.tensor(5.5 / 4.5))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_sequence_nll(LOGP, MASK, signed)
    with pytest.raises(ValueError, match="3 weights for 2 sequences"):
        weighted_sequence_nll(LOGP[:2], MASK[:2], weights)


def test_weighted_sequence_nll_gradient_and_empty_selection():
    logp = LOGP.clone().requires_grad_(True)
    # grad of sum_i w_i NLL_i / Z w.r.t. logp_it = -w_i m_it / Z ; w = [1, 0, 1], Z = 5
    weighted_sequence_nll(logp, MASK, torch.tensor([1.0, 0.0, 1.0])).backward()
    expected = -torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.float32) / 5
    assert_close(logp.grad, expected)
    # nothing kept: loss 0, still differentiable (gradient 0)
    logp.grad = None
    loss = weighted_sequence_nll(logp, MASK, torch.zeros(3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(LOGP))


def test_weights_shaped_per_prompt_are_flattened_in_row_order():
    # [prompts=1, k=3] weights apply to rows 0, 1, 2 in order
    grouped = torch.tensor([[1.0, 0.0, 1.0]])
    assert_close(weighted_sequence_nll(LOGP, MASK, grouped), torch.tensor(1.8))


def test_naive_loss_is_unbounded_below():
    # one positive and one negative sample: as the negative's log-prob falls, the loss falls without end
    mask = torch.ones(2, 1)
    signs = naive_sign_rewards(torch.tensor([1.0, -1.0]), 0.0)
    losses = [weighted_sequence_nll(torch.tensor([[-0.1], [-x]]), mask, signs, "tokens").item()
              for x in (1.0, 10.0, 100.0)]
    # (0.1 - x) / 2
    assert losses == pytest.approx([-0.45, -4.95, -49.95])
