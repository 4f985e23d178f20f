import torch
from torch.testing import assert_close

from lightrlhf.rl import last_valid_index, per_token_rewards


def test_last_valid_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    # full row -> 3 ; all-zero row -> 0 by convention
    out = last_valid_index(mask)
    assert out.dtype == torch.long
    assert out.tolist() == [2, 0, 3, 0]
    assert last_valid_index(mask.bool()).tolist() == [2, 0, 3, 0]


def test_per_token_rewards_by_hand():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, -0.1, 5.0], [0.3, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # row 0: -0.5*kl = [-0.05, -0.1, 0.05], score 1 at t=2: 0.05 + 1 = 1.05
    # row 1: one token: -0.5*0.3 - 2 = -2.15 ; padding's kl of 5 and 7 is ignored
    expected = torch.tensor([[-0.05, -0.1, 1.05, 0.0], [-2.15, 0.0, 0.0, 0.0]])
    out = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out[~mask.bool()] == 0).all()


def test_zero_kl_coef_puts_only_the_score_at_the_end():
    mask = torch.tensor([[1, 1, 0]])
    out = per_token_rewards(torch.tensor([3.0]), torch.ones(1, 3), mask, kl_coef=0.0)
    assert_close(out, torch.tensor([[0.0, 3.0, 0.0]]), rtol=0, atol=0)


def test_all_masked_row_gets_no_score():
    # row 0: [-0.1, -0.1 + 4 = 3.9] ; row 1: its score would land at index 0, a padded position
    mask = torch.tensor([[1, 1], [0, 0]])
    out = per_token_rewards(torch.tensor([4.0, 3.0]), torch.ones(2, 2), mask, kl_coef=0.1)
    assert_close(out, torch.tensor([[-0.1, 3.9], [0.0, 0.0]]), rtol=0, atol=1e-6)
