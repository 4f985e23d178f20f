"""Group baselines (GRPO, Dr. GRPO, RLOO), loss aggregation and the KL term, against values by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import aggregate, aggregation_normalizer, kl_k3
from lightrlhf.rl.group import (
    fraction_zero_std_groups,
    group_advantages,
    group_mean_advantages,
    group_policy_objective,
    leave_one_out_advantages,
    sequence_kl,
)
from lightrlhf.rl.kl import kl_k3_importance_weighted

# two prompts, k = 3 responses each: rows 0-2 answer prompt 0, rows 3-5 prompt 1
REWARDS = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])


def test_grpo_advantage_by_hand():
    # group 0: mean (1 + 2 + 6) / 3 = 3 ; centred [-2, -1, 3]
    # sample std = sqrt((4 + 1 + 9) / (3 - 1)) = sqrt(7) = 2.6457513 ; + eps 1e-4 = 2.6458513
    # A = [-2, -1, 3] / 2.6458513 = [-0.7559009, -0.3779505, 1.1338514]
    # group 1: all 5 -> centred 0, std 0 -> 0 / (0 + eps) = 0
    expected = torch.tensor([-0.7559009, -0.3779505, 1.1338514, 0.0, 0.0, 0.0])
    assert_close(group_mean_advantages(REWARDS, 3), expected, rtol=0, atol=1e-6)
    assert_close(group_advantages(REWARDS, 3, "grpo"), expected, rtol=0, atol=1e-6)


def test_dr_grpo_advantage_is_not_scaled_by_the_group_std():
    # r - mean: [1 - 3, 2 - 3, 6 - 3] = [-2, -1, 3] ; group 1: [0, 0, 0]
    expected = torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    assert_close(group_mean_advantages(REWARDS, 3, scale=False), expected, rtol=0, atol=0)
    assert_close(group_advantages(REWARDS, 3, "grpo", scale=False), expected, rtol=0, atol=0)


def test_rloo_leave_one_out_by_hand():
    # A_i = r_i - mean of the others:
    #   1 - (2 + 6) / 2 = -3 ;  2 - (1 + 6) / 2 = -1.5 ;  6 - (1 + 2) / 2 = 4.5 ;  5 - (5 + 5) / 2 = 0
    # (= k/(k-1) (r - mean) = 1.5 * [-2, -1, 3])
    expected = torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    assert_close(leave_one_out_advantages(REWARDS, 3), expected, rtol=0, atol=1e-6)
    # `scale` is GRPO's: RLOO ignores it
    assert_close(group_advantages(REWARDS, 3, "rloo", scale=True), expected, rtol=0, atol=1e-6)


def test_groups_of_size_one_and_ragged_groups_are_refused():
    with pytest.raises(ValueError, match="at least 2 responses per prompt, got group_size=1"):
        group_advantages(REWARDS, 1, "grpo")
    with pytest.raises(ValueError, match="at least 2 responses per prompt, got group_size=1"):
        leave_one_out_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match=r"rewards must be \[prompts \* group_size\]"):
        group_advantages(REWARDS, 4, "rloo")  # 6 rows do not make groups of 4
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(REWARDS, 3, "ppo")


def test_group_diagnostics():
    assert fraction_zero_std_groups(REWARDS, 3).item() == 0.5  # group 1 is all 5s
    # sum over [[1, -2, pad], [0.5, pad, pad]] valid tokens: -1 and 0.5
    logp = torch.tensor([[-1.0, -3.0, 9.0], [-0.5, 9.0, 9.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert_close(sequence_kl(logp, ref, mask), torch.tensor([-1.0, 0.5]), rtol=0, atol=0)


# -- aggregation: token_mean, seq_mean, dr_grpo --------------------------------------------------------
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])  # 99 = padding
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregations_by_hand():
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert aggregate(PER_TOKEN, MASK, "token_mean").item() == 2.5
    # seq_mean: mean of row means (1 + 2 + 3) / 3 = 2 and 4 / 1 = 4 -> 3
    assert aggregate(PER_TOKEN, MASK, "seq_mean").item() == 3.0
    # dr_grpo: 10 / (2 rows x max_new_tokens 8) = 0.625: the divisor is not the rollout's width (4)
    normalizer = aggregation_normalizer(MASK, "dr_grpo", max_new_tokens=8)
    assert normalizer.item() == 16.0
    assert aggregate(PER_TOKEN, MASK, "dr_grpo", normalizer).item() == 0.625
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregation_normalizer(MASK, "dr_grpo")
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(PER_TOKEN, MASK, "dr_grpo")


def _per_token_gradient(aggregation):
    """d loss / d logp_t for the surrogate -A * logp on a long (3 tokens) and a short (1 token) answer,
    both with advantage -1 (two wrong answers)."""
    logp = torch.zeros(2, 4, requires_grad=True)
    normalizer = aggregation_normalizer(MASK, aggregation, max_new_tokens=8)
    aggregate(-(-1.0) * logp, MASK, aggregation, normalizer).backward()
    return logp.grad


def test_length_effect_of_each_aggregation():
    # token_mean: every valid token 1/4 (4 tokens in the batch), long and short alike
    assert_close(_per_token_gradient("token_mean"), torch.tensor([[0.25] * 3 + [0.0], [0.25, 0, 0, 0]]))
    # seq_mean: 1 / (2 rows x |o_i|): the long wrong answer's tokens are pushed down 3x less (1/6 vs 1/2)
    # than the short one's, so wrong answers drift longer (Liu et al. 2025)
    assert_close(_per_token_gradient("seq_mean"), torch.tensor([[1 / 6] * 3 + [0.0], [0.5, 0, 0, 0]]))
    # dr_grpo: 1 / (2 rows x 8 max_new_tokens) = 1/16 for every token, whatever the lengths in the batch
    assert_close(_per_token_gradient("dr_grpo"), torch.tensor([[1 / 16] * 3 + [0.0], [1 / 16, 0, 0, 0]]))


# -- the KL term: value and gradient ------------------------------------------------------------------
THETA = torch.tensor([0.2, -0.5, 1.0, 0.3])  # policy logits over 4 tokens
REF = torch.log_softmax(torch.tensor([0.0, 0.4, -0.3, 0.1]), -1)


def _true_kl_gradient(theta):
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    (logp.exp() * (logp - REF)).sum().backward()  # KL(pi || ref) = sum_y pi(y) (log pi(y) - log ref(y))
    return theta.grad


def _expected_sample_gradient(estimator, theta, behaviour):
    """E_{y ~ behaviour}[grad_theta estimator(y)], by enumerating the 4 tokens: the exact expectation."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    old = torch.log_softmax(behaviour, -1).detach()
    (old.exp() * estimator(logp, old, REF)).sum().backward()
    return theta.grad


def _naive_k3(logp, old, ref):
    return kl_k3(logp, ref)


def test_importance_weighted_k3_gradient_is_the_kl_gradient_and_plain_k3_is_not():
    true = _true_kl_gradient(THETA)
    # samples from the current policy (the first update on a rollout): exact enumeration, equal to float error
    assert_close(_expected_sample_gradient(kl_k3_importance_weighted, THETA, THETA), true, rtol=0, atol=1e-6)
    # samples from an older policy (num_iterations > 1 reuses the rollout): still unbiased
    older = THETA + torch.tensor([0.3, 0.0, -0.4, 0.2])
    assert_close(_expected_sample_gradient(kl_k3_importance_weighted, THETA, older), true, rtol=0, atol=1e-6)
    # plain k3 differentiated through log pi: E_pi[(1 - ref/pi) grad log pi] = -E_ref[grad log pi],
    # the gradient of the *reverse* KL(ref || pi), not of KL(pi || ref)
    naive = _expected_sample_gradient(_naive_k3, THETA, THETA)
    theta = THETA.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    (REF.exp() * (REF - logp)).sum().backward()
    assert_close(naive, theta.grad, rtol=0, atol=1e-6)
    assert (naive - true).abs().max().item() > 0.05


def test_importance_weighted_k3_value_is_k3_on_the_rollout_policy():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    # rho = exp(logp - old) = 1, so the value is k3: [0.106531, 0.718282, 0] (tests/rl/test_kl.py)
    assert_close(kl_k3_importance_weighted(logp, logp.clone(), ref), torch.tensor([0.106531, 0.718282, 0.0]),
                 rtol=0, atol=1e-6)


def test_monte_carlo_average_of_the_sample_gradient_matches_the_kl_gradient():
    """n = 200,000 draws from pi with a fixed seed. The per-sample gradient g(y) = (log pi(y) - log ref(y))
    (e_y - pi) has a covariance we can enumerate exactly, so the tolerance is 5 standard errors
    sqrt(Var g_j / n) per coordinate: a correct estimator misses it with probability ~6e-7 (normal
    approximation), while plain k3's bias (> 0.05, above) is ~30 standard errors."""
    n = 200_000
    draws = torch.multinomial(torch.softmax(THETA, -1), n, replacement=True, generator=torch.Generator().manual_seed(0))
    true = _true_kl_gradient(THETA)
    pi = torch.softmax(THETA, -1)
    per_sample = (torch.log(pi) - REF)[:, None] * (torch.eye(4) - pi)  # row y: g(y)
    standard_error = ((pi[:, None] * (per_sample - true) ** 2).sum(0) / n).sqrt()

    def mc(estimator):
        theta = THETA.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, -1)[draws]
        estimator(logp, logp.detach(), REF[draws]).mean().backward()
        return theta.grad

    assert ((mc(kl_k3_importance_weighted) - true).abs() <= 5 * standard_error).all()
    assert ((mc(_naive_k3) - true).abs() > 5 * standard_error).any()


# -- the objective: ratio exactly 1 and KL exactly 0 at step 0, padding included -----------------------
def _batch():
    # 2 responses, 3 and 1 tokens; padding holds garbage log-probs the loss must never see
    logp = torch.tensor([[-1.0, -0.5, -2.0, 40.0], [-0.2, -80.0, math.inf, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    return logp, mask, torch.tensor([1.0, -2.0])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "dr_grpo"])
def test_step_zero_ratio_is_exactly_one_and_kl_exactly_zero(aggregation):
    logp, mask, advantages = _batch()
    old = torch.where(mask.bool(), logp, 0.0)  # the rollout's log-probs: 0 at padding, not the garbage
    current = logp.clone().requires_grad_(True)
    normalizer = aggregation_normalizer(mask, aggregation, max_new_tokens=4)
    out = group_policy_objective(current, old, old.clone(), advantages, mask, clip_range=0.2, kl_coef=0.1,
                                 aggregation=aggregation, normalizer=normalizer)
    assert out.policy.ratio_mean.item() == 1.0 and out.policy.approxkl.item() == 0.0
    assert out.policy.clipfrac.item() == 0.0 and out.kl.item() == 0.0
    # the loss is -agg(A): token_mean -(1 * 3 - 2 * 1) / 4 = -0.25 ; seq_mean -(1 - 2) / 2 = 0.5 ;
    # dr_grpo -(3 - 2) / (2 x 4) = -0.125
    expected = {"token_mean": -0.25, "seq_mean": 0.5, "dr_grpo": -0.125}[aggregation]
    assert out.objective.item() == pytest.approx(expected, abs=1e-7)
    out.objective.backward()
    assert torch.isfinite(current.grad).all() and (current.grad[~mask.bool()] == 0).all()


def test_kl_term_value_and_clipping_on_a_later_iteration():
    logp, mask, advantages = _batch()
    old = torch.where(mask.bool(), logp, 0.0)
    # a later pass: the policy moved up by log 1.5 on every token; the reference is log 2 below the rollout's
    current = (old + math.log(1.5)).requires_grad_(True)
    ref = old - math.log(2.0)
    out = group_policy_objective(current, old, ref, advantages, mask, clip_range=0.2, kl_coef=0.1)
    # ratio 1.5 everywhere; row 0 (A = +1) is clipped at 1.2 (3 tokens), row 1 (A = -2) is not (1 token)
    assert out.policy.ratio_mean.item() == pytest.approx(1.5) and out.policy.clipfrac.item() == pytest.approx(0.75)
    # surrogate: (3 x -1.2 + 1 x (2 x 1.5)) / 4 = -0.15
    assert out.policy.loss.item() == pytest.approx(-0.15, abs=1e-6)
    # KL term per token: rho * k3 with logr = ref - logp = -log 2 - log 1.5 = -log 3:
    # 1.5 * (1/3 - 1 + log 3) = 1.5 * 0.4319456 = 0.6479184, the same on every token
    assert out.kl.item() == pytest.approx(0.6479184, abs=1e-6)
    assert out.objective.item() == pytest.approx(-0.15 + 0.1 * 0.6479184, abs=1e-6)


def test_no_reference_needed_without_a_kl_term():
    logp, mask, advantages = _batch()
    old = torch.where(mask.bool(), logp, 0.0)
    out = group_policy_objective(old.clone(), old, torch.full_like(old, math.nan), advantages, mask, clip_range=0.2)
    assert out.kl.item() == 0.0 and torch.isfinite(out.objective)
    # ... so none may be given; with a KL term it must be
    without = group_policy_objective(old.clone(), old, None, advantages, mask, clip_range=0.2)
    assert without.objective.item() == out.objective.item() and without.kl.item() == 0.0
    with pytest.raises(ValueError, match="kl_coef > 0 needs the reference's log-probs"):
        group_policy_objective(old.clone(), old, None, advantages, mask, clip_range=0.2, kl_coef=0.1)
