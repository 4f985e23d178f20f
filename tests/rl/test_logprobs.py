import math

import torch
from torch.testing import assert_close

from lightrlhf.rl import entropy_from_logits, token_logprobs

# Row 0 is uniform over 4 tokens; row 1 is p = [1, 2, 3, 2] / 8 (logits are log counts).
UNIFORM = [0.0, 0.0, 0.0, 0.0]
COUNTS = [math.log(1), math.log(2), math.log(3), math.log(2)]


def _logits():
    return torch.tensor([[UNIFORM, COUNTS, COUNTS], [COUNTS, UNIFORM, UNIFORM]])  # [B=2, T=3, V=4]


def test_token_logprobs_by_hand():
    tokens = torch.tensor([[1, 2, 0], [3, 0, 3]])
    # log(1/4) = -1.386294 ; log(3/8) = -0.980829 ; log(1/8) = -2.079442 ; log(2/8) = -1.386294
    expected = torch.tensor([[-1.386294, -0.980829, -2.079442], [-1.386294, -1.386294, -1.386294]])
    assert_close(token_logprobs(_logits(), tokens), expected, rtol=0, atol=1e-5)


def test_token_logprobs_with_temperature():
    # log([1, 4]) / 2 = log([1, 2]): p = [1/3, 2/3] ; log(2/3) = -0.405465, log(1/3) = -1.098612
    logits = torch.tensor([[[0.0, math.log(4)], [0.0, math.log(4)]]])
    out = token_logprobs(logits, torch.tensor([[1, 0]]), temperature=2.0)
    assert_close(out, torch.tensor([[-0.405465, -1.098612]]), rtol=0, atol=1e-5)


def test_token_logprobs_upcasts_bf16_and_stays_finite_for_large_logits():
    # logits [0, 100]: log p(0) = 0 - logsumexp(0, 100) = -(100 + log(1 + e^-100)) = -100
    logits = torch.tensor([[[0.0, 100.0]]], dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([[0]]))
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[-100.0]]), rtol=0, atol=1e-4)


def test_token_logprobs_bf16_matches_its_float32_upcast():
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    tokens = torch.tensor([[0, 1, 2], [3, 2, 1]])
    # the bf16 input values are exact in float32, so the two paths agree to float32 rounding
    expected = token_logprobs(logits.float(), tokens)
    assert_close(token_logprobs(logits, tokens), expected, rtol=0, atol=1e-6)


def test_entropy_by_hand():
    # uniform: log 4 = 1.386294
    # [1,2,3,2]/8: 1/8*log 8 + 2*(1/4)*log 4 + 3/8*log(8/3)
    #   = 0.259930 + 0.693147 + 0.367811 = 1.320888
    expected = torch.tensor([[1.386294, 1.320888, 1.320888], [1.320888, 1.386294, 1.386294]])
    assert_close(entropy_from_logits(_logits()), expected, rtol=0, atol=1e-5)


def test_entropy_with_temperature():
    # p = [1/3, 2/3]: H = log 3 - (2/3) log 2 = 1.098612 - 0.462098 = 0.636514
    logits = torch.tensor([[[0.0, math.log(4)]]])
    out = entropy_from_logits(logits, temperature=2.0)
    assert_close(out, torch.tensor([[0.636514]]), rtol=0, atol=1e-5)


def test_entropy_with_filtered_vocabulary_is_finite():
    # logits [0, 0, -inf]: two equally likely tokens, H = log 2 = 0.693147, not nan
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert_close(h, torch.tensor([[0.693147]]), rtol=0, atol=1e-6)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
