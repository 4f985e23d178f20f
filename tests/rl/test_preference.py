import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import bradley_terry_loss

CHOSEN = torch.tensor([2.0, 0.0])
REJECTED = torch.tensor([0.0, 0.0])


def test_plain_bradley_terry_by_hand():
    # d = [2, 0]: -log sigmoid(2) = log(1 + e^-2) = 0.126928 ; -log sigmoid(0) = log 2 = 0.693147
    per_pair = bradley_terry_loss(CHOSEN, REJECTED, reduction="none")
    assert_close(per_pair, torch.tensor([0.126928, 0.693147]), rtol=0, atol=1e-6)
    # mean = (0.126928 + 0.693147) / 2 = 0.410038
    assert_close(bradley_terry_loss(CHOSEN, REJECTED), torch.tensor(0.410038), rtol=0, atol=1e-6)


def test_margin_is_subtracted_from_the_difference():
    # d = 2 - 0 - 1 = 1: log(1 + e^-1) = 0.313262 ; pair 2 has margin 0: log 2
    out = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([1.0, 0.0]), reduction="none")
    assert_close(out, torch.tensor([0.313262, 0.693147]), rtol=0, atol=1e-6)


def test_label_smoothing():
    # d = 2, eps = 0.1: 0.9 * log(1 + e^-2) + 0.1 * log(1 + e^2)
    #   = 0.9 * 0.126928 + 0.1 * 2.126928 = 0.114235 + 0.212693 = 0.326928
    # d = 0: both terms are log 2, whatever eps
    out = bradley_terry_loss(CHOSEN, REJECTED, label_smoothing=0.1, reduction="none")
    assert_close(out, torch.tensor([0.326928, 0.693147]), rtol=0, atol=1e-6)


def test_center_coef_adds_squared_reward_sum():
    # pair 1: 0.126928 + 0.01 * (2 + 0)^2 = 0.166928 ; pair 2: r_c + r_r = 0, no penalty
    out = bradley_terry_loss(CHOSEN, REJECTED, center_coef=0.01, reduction="none")
    assert_close(out, torch.tensor([0.166928, 0.693147]), rtol=0, atol=1e-6)


def test_gradient_at_equal_rewards():
    chosen = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(chosen, torch.zeros(2)).backward()
    # d/dr_c of -log sigmoid(d) = -(1 - sigmoid(0)) = -0.5, then / 2 for the mean over pairs
    assert_close(chosen.grad, torch.tensor([-0.25, -0.25]), rtol=0, atol=1e-7)


def test_extreme_differences_stay_finite():
    # d = 200: loss log(1 + e^-200) ~ 0 ; d = -200: loss ~ 200 (log(sigmoid) would give inf)
    chosen, rejected = torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0])
    out = bradley_terry_loss(chosen, rejected, reduction="none")
    assert_close(out, torch.tensor([0.0, 200.0]), rtol=0, atol=1e-4)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(CHOSEN, REJECTED, reduction="sum")


def test_soft_bradley_terry_by_hand_for_a_b_and_tie():
    from lightrlhf.rl.preference import soft_bradley_terry_loss

    a, b = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 0.0, 0.0])
    # y = 1: -log sigmoid(2) = 0.126928 ; y = 0: -log sigmoid(-2) = log(1 + e^2) = 2.126928
    # y = 1/2: 0.5 * 0.126928 + 0.5 * 2.126928 = 1.126928
    out = soft_bradley_terry_loss(a, b, torch.tensor([1.0, 0.0, 0.5]), reduction="none")
    assert_close(out, torch.tensor([0.126928, 2.126928, 1.126928]), rtol=0, atol=1e-6)
    # a hard label is the plain loss; a tie is plain loss with label smoothing 1/2
    assert_close(out[0], bradley_terry_loss(a[:1], b[:1]), rtol=0, atol=1e-7)
    assert_close(out[2], bradley_terry_loss(a[:1], b[:1], label_smoothing=0.5), rtol=0, atol=1e-7)
    # a tie is smallest when the two returns are equal: the gradient pulls them together
    d = torch.tensor([1.0], requires_grad=True)
    soft_bradley_terry_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert_close(d.grad, torch.tensor([torch.sigmoid(torch.tensor(1.0)).item() - 0.5]), rtol=0, atol=1e-6)
