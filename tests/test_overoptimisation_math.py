"""Gao et al.'s forms, fitted by least squares through the origin: hand-computed values."""

from __future__ import annotations

import math

import pytest

from lightrlhf.rl.overoptimisation import Fit, distance, fit, peak_of


def test_an_exact_best_of_n_curve_is_recovered_with_r_squared_one():
    d = [0.5, 1.0, 1.5, 2.0]
    gains = [x * (1.2 - 0.4 * x) for x in d]  # 0.5, 0.8, 0.9, 0.8
    assert gains == pytest.approx([0.5, 0.8, 0.9, 0.8])
    result = fit("best_of_n", d, gains)
    assert (result.alpha, result.beta, result.r_squared) == pytest.approx((1.2, 0.4, 1.0))
    assert result.peak() == pytest.approx((1.5, 0.9))  # d* = alpha / (2 beta)


def test_an_exact_rl_curve_is_recovered_and_its_peak_is_exp_of_alpha_over_beta_minus_one():
    d = [0.5, 1.0, 2.0, 4.0]
    gains = [x * (0.6 - 0.3 * math.log(x)) for x in d]
    result = fit("rl", d, gains)
    assert (result.alpha, result.beta, result.r_squared) == pytest.approx((0.6, 0.3, 1.0))
    d_star, r_star = result.peak()
    assert d_star == pytest.approx(math.exp(0.6 / 0.3 - 1))  # e
    assert r_star == pytest.approx(0.3 * math.e)  # d* (alpha - beta log d*) = e (0.6 - 0.3)


def test_least_squares_by_hand_on_points_off_the_curve():
    # best_of_n, regressors x1 = d, x2 = -d^2 at d = 1, 2: X = [[1, -1], [2, -4]] is square, so the
    # fit passes through both points: a - b = 1, 2a - 4b = 1 -> b = 0.5, a = 1.5. A third point
    # off the curve: d = 3 with R = 0 (the curve says 3 (1.5 - 1.5) = 0): still exact.
    exact = fit("best_of_n", [1, 2, 3], [1, 1, 0])
    assert (exact.alpha, exact.beta, exact.r_squared) == pytest.approx((1.5, 0.5, 1.0))
    # Now R = 0.3 at d = 3. Normal equations: X^T X = [[14, -36], [-36, 98]], X^T y = [3.9, -7.7]
    # -> det = 1372 - 1296 = 76; a = (98*3.9 - 36*7.7) / 76 = 105/76; b = (14*(-7.7) + 36*3.9)/76 = 32.6/76
    off = fit("best_of_n", [1, 2, 3], [1, 1, 0.3])
    assert off.alpha == pytest.approx(105 / 76) and off.beta == pytest.approx(32.6 / 76)
    fitted = [off(x) for x in (1, 2, 3)]
    residual = sum((f - y) ** 2 for f, y in zip(fitted, [1, 1, 0.3]))
    total = sum((y - 2.3 / 3) ** 2 for y in [1, 1, 0.3])
    assert off.r_squared == pytest.approx(1 - residual / total)
    assert off.r_squared < 1


def test_a_curve_without_a_bend_has_no_peak():
    rising = Fit("best_of_n", alpha=1.0, beta=-0.1, r_squared=1.0, points=3)
    assert rising.peak() is None and rising(0.0) == 0.0


def test_distance_is_the_square_root_of_kl_clamped_at_zero():
    assert distance(4.0) == 2.0 and distance(-0.01) == 0.0


def test_fits_need_two_positive_distances_and_no_negative_one():
    with pytest.raises(ValueError):
        fit("rl", [0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError):
        fit("rl", [-1.0, 1.0, 2.0], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        fit("linear", [1.0, 2.0], [1.0, 2.0])


def test_the_peak_of_a_measured_curve_and_its_drop():
    peak = peak_of([0.5, 0.9, 1.2, 1.0, 0.7])
    assert (peak.index, peak.value, peak.final, peak.start) == (2, 1.2, 0.7, 0.5)
    assert peak.drop == pytest.approx(0.5) and peak.peaked_and_fell
    assert not peak_of([0.5, 0.6, 0.7]).peaked_and_fell  # still rising at the end: no over-optimisation seen
    assert peak_of([1.0, 1.0]).index == 0  # the first of equal maxima
