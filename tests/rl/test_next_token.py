import math

import pytest
import torch

from lightrlhf.rl import filter_logits, sample_tokens

NEG_INF = float("-inf")


def _logits(*probs):
    return torch.tensor([[math.log(p) for p in row] for row in probs])


def _kept(filtered):
    return (filtered != NEG_INF).tolist()


@pytest.mark.parametrize(
    "top_p,kept",
    [
        (1.0, [True, True, True, True]),  # off
        (0.8, [True, True, False, False]),  # 0.5 + 0.3 = 0.8 reaches 0.8
        (0.75, [True, True, False, False]),  # 0.5 < 0.75, 0.8 >= 0.75
        (0.81, [True, True, True, False]),  # needs 0.5 + 0.3 + 0.15 = 0.95
        (0.5, [True, False, False, False]),  # 0.5 alone reaches 0.5
        (0.0, [True, False, False, False]),  # at least one token is always kept
    ],
)
def test_top_p_by_hand(top_p, kept):
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    assert _kept(filter_logits(logits, top_p=top_p)) == [kept]


def test_kept_logits_are_unchanged_and_input_is_not_modified():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    before = logits.clone()
    out = filter_logits(logits, top_k=3, top_p=0.75)
    assert torch.equal(logits, before)
    assert torch.equal(out[0, :2], logits[0, :2])


def test_rows_are_filtered_independently_and_in_any_order():
    # row 1 is row 0 permuted: the same tokens must survive wherever they sit
    logits = _logits([0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.5, 0.3])
    by_p = [[True, True, False, False], [False, False, True, True]]
    by_k = [[True, False, False, False], [False, False, True, False]]
    assert _kept(filter_logits(logits, top_p=0.75)) == by_p
    assert _kept(filter_logits(logits, top_k=1)) == by_k


def test_top_k_then_top_p_renormalises_after_top_k():
    logits = _logits([0.4, 0.3, 0.2, 0.1])
    # top_p alone at 0.75: mass before each token [0, 0.4, 0.7, 0.9] -> keeps three
    assert _kept(filter_logits(logits, top_p=0.75)) == [[True, True, True, False]]
    # top_k=3 first: [0.4, 0.3, 0.2] / 0.9 = [0.444, 0.333, 0.222]; mass before [0, 0.444, 0.778]
    # -> 0.778 >= 0.75, keeps two
    assert _kept(filter_logits(logits, top_k=3, top_p=0.75)) == [[True, True, False, False]]


def test_ties():
    logits = _logits([0.3, 0.1, 0.3, 0.3])
    # top_k keeps every token tied with the k-th largest
    assert _kept(filter_logits(logits, top_k=1)) == [[True, False, True, True]]
    # top_p=0.5: two of the three tied tokens reach 0.6; the lower indices win
    assert _kept(filter_logits(logits, top_p=0.5)) == [[True, False, True, False]]


def test_top_k_larger_than_vocab_keeps_all():
    logits = _logits([0.5, 0.5])
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(1, 3), top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(torch.zeros(1, 3), top_k=-1)


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 3.0, 1.0]])
    # row 1 ties at 3.0: argmax takes the first
    assert sample_tokens(logits, temperature=0.0).tolist() == [1, 0]


def test_sampling_respects_filters_and_generator():
    logits = _logits([0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.5, 0.3]).repeat(500, 1)
    def draw():
        return sample_tokens(logits, 1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))

    draws = draw()
    assert draws.shape == (1000,)
    # even rows may only draw tokens {0, 1}, odd rows {2, 3}
    assert set(draws[0::2].tolist()) == {0, 1} and set(draws[1::2].tolist()) == {2, 3}
    # renormalised: P(token 0) = 0.5 / 0.8 = 0.625; 500 draws, std ~0.022
    assert abs((draws[0::2] == 0).float().mean().item() - 0.625) < 0.08
    assert torch.equal(draws, draw())  # same seed, same draws


def test_temperature_sharpens_the_distribution():
    # p = [0.75, 0.25]: at T = 0.5 the logits double, p' = [0.9, 0.1] (0.75^2 : 0.25^2 = 9 : 1)
    logits = _logits([0.75, 0.25]).repeat(2000, 1)
    draws = sample_tokens(logits, temperature=0.5, generator=torch.Generator().manual_seed(1))
    assert abs((draws == 0).float().mean().item() - 0.9) < 0.03


def test_inverse_cdf_draws_by_hand_and_never_a_zero_probability_token():
    from lightrlhf.rl.next_token import draw_from

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.3, 0.5, 0.0]])
    # the uniforms this generator gives, by hand: row 0 u < 0.5 -> index 1 else 3; row 1 cuts 0.2, 0.5
    u = torch.rand(2, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64).squeeze(-1).tolist()
    want = [1 if u[0] < 0.5 else 3, 0 if u[1] < 0.2 else (1 if u[1] < 0.5 else 2)]
    assert draw_from(probs, torch.Generator().manual_seed(4)).tolist() == want
    many = draw_from(probs.repeat(4000, 1), torch.Generator().manual_seed(0))
    assert not bool(((many == 0) | (many == 2))[0::2].any()) and not bool((many == 3)[1::2].any())
    # frequencies within ~4 standard deviations of 0.2 / 0.3 / 0.5 (4,000 draws: std <= 0.008)
    for token, p in ((0, 0.2), (1, 0.3), (2, 0.5)):
        assert abs((many[1::2] == token).float().mean().item() - p) < 0.035
    # unnormalised weights are drawn in proportion too (u is scaled by the row's total)
    assert draw_from(torch.tensor([[0.0, 3.0]]), torch.Generator().manual_seed(0)).tolist() == [1]
