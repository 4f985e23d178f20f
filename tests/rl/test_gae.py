import torch
from torch.testing import assert_close

from lightrlhf.rl import gae


def test_gae_by_hand_with_padding_and_single_token():
    # Row 0: three valid tokens; row 1: one valid token. Padding holds junk that must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0], [2.0, 5.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0], [0.5, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, gamma*lam = 0.45, V after the last token = 0 (terminal):
    #   delta_2 = 1 + 0.9*0 - 0.2 = 0.8           A_2 = 0.8
    #   delta_1 = 0 + 0.9*0.2 - 0.4 = -0.22       A_1 = -0.22 + 0.45*0.8 = 0.14
    #   delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14       A_0 = -0.14 + 0.45*0.14 = -0.077
    #   R = A + V = [-0.077 + 0.5, 0.14 + 0.4, 0.8 + 0.2] = [0.423, 0.54, 1.0]
    # row 1: A_0 = delta_0 = 2 - 0.5 = 1.5, R_0 = 2
    expected_adv = torch.tensor([[-0.077, 0.14, 0.8, 0.0], [1.5, 0.0, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.423, 0.54, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    assert_close(ret, expected_ret, rtol=0, atol=1e-6)
    padding = ~mask.bool()
    assert (adv[padding] == 0).all() and (ret[padding] == 0).all()


def test_gamma_and_lam_one_give_monte_carlo_returns():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # R_t = sum of rewards from t: [0.6, 0.5, 0.3] ; A = R - V = [-0.4, -1.5, -2.7]
    # (check A_1 = delta_1 + delta_2 = (0.2 + 3 - 2) + (0.3 - 3) = 1.2 - 2.7 = -1.5)
    assert_close(ret, torch.tensor([[0.6, 0.5, 0.3]]), rtol=0, atol=1e-6)
    assert_close(adv, torch.tensor([[-0.4, -1.5, -2.7]]), rtol=0, atol=1e-6)


def test_lam_zero_gives_one_step_td():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # A_t = delta_t: [0.1 + 0.5*2 - 1, 0.2 + 0.5*3 - 2, 0.3 - 3] = [0.1, -0.3, -2.7]
    assert_close(adv, torch.tensor([[0.1, -0.3, -2.7]]), rtol=0, atol=1e-6)


def test_all_masked_row_is_zero():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: R = [6, 5, 3], A = R - 0.5 ; row 1 has no response at all
    assert_close(ret[0], torch.tensor([6.0, 5.0, 3.0]), rtol=0, atol=1e-6)
    assert_close(adv[0], torch.tensor([5.5, 4.5, 2.5]), rtol=0, atol=1e-6)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()
