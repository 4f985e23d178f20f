import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import masked_mean, masked_sum, masked_var, masked_whiten

NAN = float("nan")
# Valid values are 1..5; padding holds nan and inf, which must never reach a result.
X = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, 5.0, float("inf"), NAN]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("mask", [MASK, MASK.bool(), MASK.float()], ids=["long", "bool", "float"])
def test_sum_and_mean_ignore_padding_for_every_mask_dtype(mask):
    # 1+2+3+4+5 = 15 ; 15/5 = 3
    assert_close(masked_sum(X, mask), torch.tensor(15.0), rtol=0, atol=1e-6)
    assert_close(masked_mean(X, mask), torch.tensor(3.0), rtol=0, atol=1e-6)


def test_per_row_sum_and_mean():
    # row 0: 1+2+3 = 6, mean 2 ; row 1: 4+5 = 9, mean 4.5
    assert_close(masked_sum(X, MASK, dim=1), torch.tensor([6.0, 9.0]), rtol=0, atol=1e-6)
    assert_close(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 4.5]), rtol=0, atol=1e-6)


def test_mean_of_all_masked_row_is_zero_not_nan():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    assert_close(masked_mean(X, mask, dim=1), torch.tensor([2.0, 0.0]), rtol=0, atol=1e-6)
    assert masked_mean(X, torch.zeros_like(mask)).item() == 0.0


def test_var_unbiased_and_biased():
    # mean 3; squared deviations 4+1+0+1+4 = 10 ; unbiased 10/4 = 2.5, biased 10/5 = 2
    assert_close(masked_var(X, MASK), torch.tensor(2.5), rtol=0, atol=1e-6)
    assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(2.0), rtol=0, atol=1e-6)


def test_var_with_one_or_no_valid_position_is_zero():
    one = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]])
    # one value: no spread; 1/(n-1) is undefined, the decision is 0 rather than nan
    assert masked_var(X, one).item() == 0.0
    assert masked_var(X, torch.zeros_like(one)).item() == 0.0


def test_whiten_over_valid_tokens_only():
    # (x - 3) / sqrt(2.5): [-2, -1, 0, 1, 2] / 1.5811388
    #   = [-1.264911, -0.632456, 0, 0.632456, 1.264911]
    expected = torch.tensor([[-1.264911, -0.632456, 0.0, 0.0], [0.632456, 1.264911, 0.0, 0.0]])
    out = masked_whiten(X, MASK)
    assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out[~MASK.bool()] == 0).all()


def test_whiten_without_shifting_mean_adds_mean_back():
    # whitened + 3 = [1.735089, 2.367544, 3, 3.632456, 4.264911]; padding still exactly 0
    expected = torch.tensor([[1.735089, 2.367544, 3.0, 0.0], [3.632456, 4.264911, 0.0, 0.0]])
    out = masked_whiten(X, MASK, shift_mean=False)
    assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out[~MASK.bool()] == 0).all()


def test_whiten_single_valid_token_is_zero():
    # x - mean = 0 and var = 0: 0 / sqrt(0 + eps) = 0, finite
    out = masked_whiten(X, torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]]))
    assert (out == 0).all()
    assert not math.isnan(out.sum().item())
