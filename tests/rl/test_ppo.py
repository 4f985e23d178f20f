import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import clipped_value_loss, explained_variance, ppo_policy_loss

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def _policy_inputs():
    # ratios row 0: [1.5, 0.5, 1.1, pad], row 1: [0.5, 1.5, pad, pad]; old_logp = 0.
    # Padding holds a huge log-ratio (e^80 overflows float32) and a junk advantage.
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0], [0.5, 1.5, 1.0, 1.0]])
    logp = ratios.log()
    logp[MASK == 0] = 80.0
    logp.requires_grad_(True)
    old_logp = torch.zeros(2, 4, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 7.0], [1.0, -1.0, 7.0, 7.0]], requires_grad=True)
    return logp, old_logp, advantages


def test_policy_loss_by_hand_clipping_on_both_sides():
    logp, old_logp, adv = _policy_inputs()
    out = ppo_policy_loss(logp, old_logp, adv, MASK, clip_range=0.2)
    # per token max(-A*rho, -A*clip(rho, 0.8, 1.2)):
    #   rho 1.5, A  1: max(-1.5, -1.2) = -1.2   clipped (upper bound active)
    #   rho 0.5, A -1: max( 0.5,  0.8) =  0.8   clipped (lower bound active)
    #   rho 1.1, A  2: max(-2.2, -2.2) = -2.2   inside the range: not clipped (equal, not >)
    #   rho 0.5, A  1: max(-0.5, -0.8) = -0.5   unclipped term is the pessimistic one
    #   rho 1.5, A -1: max( 1.5,  1.2) =  1.5   unclipped term is the pessimistic one
    # token_mean = (-1.2 + 0.8 - 2.2 - 0.5 + 1.5) / 5 = -1.6 / 5 = -0.32 ; clipfrac = 2/5
    assert_close(out.loss, torch.tensor(-0.32), rtol=0, atol=1e-6)
    assert_close(out.clipfrac, torch.tensor(0.4), rtol=0, atol=1e-6)
    # ratio_mean = (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5 = 1.02
    assert_close(out.ratio_mean, torch.tensor(1.02), rtol=0, atol=1e-6)


def test_policy_loss_seq_mean():
    logp, old_logp, adv = _policy_inputs()
    out = ppo_policy_loss(logp, old_logp, adv, MASK, clip_range=0.2, aggregation="seq_mean")
    # row 0: (-1.2 + 0.8 - 2.2) / 3 = -0.866667 ; row 1: (-0.5 + 1.5) / 2 = 0.5
    # mean over sequences: (-0.866667 + 0.5) / 2 = -0.183333 (token_mean gave -0.32)
    assert_close(out.loss, torch.tensor(-0.183333), rtol=0, atol=1e-6)


def test_policy_gradient_flows_only_through_logp_and_not_into_padding():
    logp, old_logp, adv = _policy_inputs()
    ppo_policy_loss(logp, old_logp, adv, MASK, clip_range=0.2).loss.backward()
    assert old_logp.grad is None and adv.grad is None
    # d/dlogp of -A*rho/5 = -A*rho/5 on unclipped tokens; 0 where the clipped term (constant in
    # logp) is active
    #   rho 1.1, A 2: -2.2/5 = -0.44 ; rho 0.5, A 1: -0.5/5 = -0.1 ; rho 1.5, A -1: 1.5/5 = 0.3
    expected = torch.tensor([[0.0, 0.0, -0.44, 0.0], [-0.1, 0.3, 0.0, 0.0]])
    assert_close(logp.grad, expected, rtol=0, atol=1e-6)


def test_approxkl_is_half_mean_squared_log_ratio():
    logp = torch.tensor([[0.0, 0.2, -0.4, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_policy_loss(logp, torch.zeros(1, 4), torch.zeros(1, 4), mask, clip_range=0.2)
    # 0.5 * (0 + 0.04 + 0.16) / 3 = 0.033333 ; ratio_mean = (1 + e^0.2 + e^-0.4) / 3 = 0.963908
    assert_close(out.approxkl, torch.tensor(0.033333), rtol=0, atol=1e-6)
    assert_close(out.ratio_mean, torch.tensor(0.963908), rtol=0, atol=1e-6)
    assert out.loss.item() == 0.0  # zero advantages


def test_policy_loss_all_masked_row_and_unknown_aggregation():
    logp, old_logp, adv = _policy_inputs()
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    out = ppo_policy_loss(logp, old_logp, adv, mask, clip_range=0.2, aggregation="seq_mean")
    # the empty row is left out: only row 0's mean -0.866667 remains
    assert_close(out.loss, torch.tensor(-0.866667), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(logp, old_logp, adv, mask, clip_range=0.2, aggregation="sum")


def _value_inputs():
    # c = 0.25; all numbers are exact in binary so the equal case compares exactly
    values = torch.tensor([[1.5, 0.5, 1.125, 9.0], [-0.5, 0.375, 9.0, 9.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, -9.0], [0.0, 0.0, -9.0, -9.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, 100.0], [-1.0, 0.25, 100.0, 100.0]])
    return values, old_values, returns


def test_value_loss_by_hand_clipping_on_both_sides():
    values, old_values, returns = _value_inputs()
    out = clipped_value_loss(values, old_values, returns, MASK, clip_range=0.25)
    # V, V_clip, R -> (V-R)^2, (V_clip-R)^2, max:
    #   1.5,    1.25,  2    -> 0.25,     0.5625,   0.5625    clipped (upper)
    #   0.5,    0.75,  2    -> 2.25,     1.5625,   2.25
    #   1.125,  1.125, 0    -> 1.265625, 1.265625, 1.265625  inside the range
    #   -0.5,   -0.25, -1   -> 0.25,     0.5625,   0.5625    clipped (lower)
    #   0.375,  0.25,  0.25 -> 0.015625, 0,        0.015625
    # 0.5 * (0.5625 + 2.25 + 1.265625 + 0.5625 + 0.015625) / 5 = 0.5 * 4.65625 / 5 = 0.465625
    assert_close(out.loss, torch.tensor(0.465625), rtol=0, atol=1e-6)
    assert_close(out.clipfrac, torch.tensor(0.4), rtol=0, atol=1e-6)
    out.loss.backward()
    # d/dV of 0.5*(V-R)^2/5 = (V-R)/5 on unclipped tokens, 0 on clipped ones and padding:
    #   (0.5-2)/5 = -0.3 ; (1.125-0)/5 = 0.225 ; (0.375-0.25)/5 = 0.025
    expected = torch.tensor([[0.0, -0.3, 0.225, 0.0], [0.0, 0.025, 0.0, 0.0]])
    assert_close(values.grad, expected, rtol=0, atol=1e-6)


def test_value_loss_seq_mean():
    values, old_values, returns = _value_inputs()
    out = clipped_value_loss(values, old_values, returns, MASK, 0.25, aggregation="seq_mean")
    # row 0: (0.5625 + 2.25 + 1.265625) / 3 = 1.359375 ; row 1: (0.5625 + 0.015625) / 2 = 0.2890625
    # 0.5 * (1.359375 + 0.2890625) / 2 = 0.412109375
    assert_close(out.loss, torch.tensor(0.412109375), rtol=0, atol=1e-6)


def test_explained_variance_by_hand():
    targets = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    predictions = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # targets 1,2,3,4: mean 2.5, Var = (2.25 + 0.25 + 0.25 + 2.25)/4 = 1.25
    # residuals 0,0,0,2: mean 0.5, Var = (3*0.25 + 2.25)/4 = 0.75 ; 1 - 0.75/1.25 = 0.4
    out = explained_variance(predictions, targets, mask)
    assert_close(out, torch.tensor(0.4), rtol=0, atol=1e-6)
    assert_close(explained_variance(targets, targets, mask), torch.tensor(1.0), rtol=0, atol=0)


def test_explained_variance_without_target_variance_is_zero():
    targets = torch.tensor([[2.0, 2.0, 5.0]])
    predictions = torch.tensor([[1.0, 3.0, 0.0]])
    constant = torch.tensor([[1, 1, 0]])
    for mask in (constant, torch.tensor([[0, 0, 1]]), torch.zeros(1, 3)):
        out = explained_variance(predictions, targets, mask)
        assert out.item() == 0.0 and not math.isnan(out.item())
