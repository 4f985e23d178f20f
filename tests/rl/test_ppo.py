import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import (
    aggregate,
    aggregation_normalizer,
    clipped_value_loss,
    explained_variance,
    masked_mean,
    policy_objective,
    ppo_minibatch_loss,
    ppo_policy_loss,
    value_objective,
)

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


def _minibatch_inputs():
    # 2x3, five valid tokens; old_logp = 0 so rho = exp(logp). The padded position holds junk.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.9, 2.0, 1.0]])
    inputs = dict(
        logp=ratios.log(),
        entropy=torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 100.0]]),
        values=torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.5, 9.0]]),
        old_logp=torch.zeros(2, 3),
        advantages=torch.tensor([[2.0, 1.0, 1.0], [-1.0, -2.0, 5.0]]),
        old_values=torch.tensor([[1.0, 1.0, 0.5], [0.5, 2.0, -9.0]]),
        returns=torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 100.0]]),
        mask=mask,
    )
    coefs = dict(clip_range=0.2, value_clip_range=0.25, vf_coef=0.5, entropy_coef=0.1)
    return inputs, coefs


def test_minibatch_loss_by_hand():
    inputs, coefs = _minibatch_inputs()
    # policy, per token max(-A*rho, -A*clip(rho, 0.8, 1.2)):
    #   rho 1.0, A  2: max(-2.0, -2.0) = -2.0
    #   rho 1.5, A  1: max(-1.5, -1.2) = -1.2   clipped
    #   rho 0.5, A  1: max(-0.5, -0.8) = -0.5
    #   rho 0.9, A -1: max( 0.9,  0.9) =  0.9
    #   rho 2.0, A -2: max( 4.0,  2.4) =  4.0
    #   sum = 1.2 -> token_mean 1.2/5 = 0.24
    # entropy: sum = 1 + 2 + 3 + 0.5 + 1.5 = 8 -> 8/5 = 1.6 ; policy objective 0.24 - 0.1*1.6 = 0.08
    # value, c = 0.25: V, V_clip, R -> (V-R)^2, (V_clip-R)^2, max:
    #   1.0, 1.0,  2 -> 1,    1,      1
    #   2.0, 1.25, 1 -> 1,    0.0625, 1
    #   0.0, 0.25, 0 -> 0,    0.0625, 0.0625
    #   0.5, 0.5,  0 -> 0.25, 0.25,   0.25
    #   1.5, 1.75, 1 -> 0.25, 0.5625, 0.5625
    #   sum = 2.875 -> value loss 0.5 * 2.875/5 = 0.2875 ; value objective 0.5 * 0.2875 = 0.14375
    # total = 0.08 + 0.14375 = 0.22375
    loss = ppo_minibatch_loss(**inputs, **coefs)
    assert_close(loss, torch.tensor(0.22375), rtol=0, atol=1e-6)
    # seq_mean: policy rows (-2 - 1.2 - 0.5)/3 = -1.233333, (0.9 + 4)/2 = 2.45 -> 0.608333
    #   entropy rows 6/3 = 2, 2/2 = 1 -> 1.5 ; policy objective 0.608333 - 0.15 = 0.458333
    #   value rows 2.0625/3 = 0.6875, 0.8125/2 = 0.40625 -> 0.5*0.546875 = 0.2734375 ; *0.5 = 0.13671875
    #   total = 0.458333 + 0.136719 = 0.595052
    loss = ppo_minibatch_loss(**inputs, **coefs, aggregation="seq_mean")
    assert_close(loss, torch.tensor(0.595052), rtol=0, atol=1e-6)
    # as one micro-batch of a minibatch with 10 valid tokens, each sum is divided by 10:
    #   1.2/10 - 0.1 * 8/10 + 0.5 * 0.5 * 2.875/10 = 0.12 - 0.08 + 0.071875 = 0.111875
    loss = ppo_minibatch_loss(**inputs, **coefs, normalizer=10.0)
    assert_close(loss, torch.tensor(0.111875), rtol=0, atol=1e-6)


def test_minibatch_loss_is_policy_plus_value_objective():
    inputs, coefs = _minibatch_inputs()
    policy = policy_objective(inputs["logp"], inputs["entropy"], inputs["old_logp"], inputs["advantages"],
                              inputs["mask"], clip_range=0.2, entropy_coef=0.1)
    value = value_objective(inputs["values"], inputs["old_values"], inputs["returns"], inputs["mask"],
                            clip_range=0.25, vf_coef=0.5)
    assert_close(policy.policy.loss, torch.tensor(0.24), rtol=0, atol=1e-6)
    assert_close(policy.entropy, torch.tensor(1.6), rtol=0, atol=1e-6)
    assert_close(value.value.loss, torch.tensor(0.2875), rtol=0, atol=1e-6)
    assert torch.equal(policy.objective + value.objective, ppo_minibatch_loss(**inputs, **coefs))


def _random_minibatch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows, length = 8, 6
    # ragged right padding: lengths 1..6 and one empty row
    lengths = torch.tensor([1, 6, 2, 0, 5, 3, 6, 4])
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()

    def randn():
        return torch.randn(rows, length, generator=generator)

    return dict(
        logp=(0.3 * randn() - 1.0).requires_grad_(),
        entropy=randn().abs().requires_grad_(),
        values=randn().requires_grad_(),
        old_logp=0.3 * randn() - 1.0,
        advantages=randn(),
        old_values=randn(),
        returns=randn(),
        mask=mask,
    )


def _objectives(batch, idx, aggregation, normalizer):
    policy = policy_objective(batch["logp"][idx], batch["entropy"][idx], batch["old_logp"][idx],
                              batch["advantages"][idx], batch["mask"][idx], clip_range=0.2, entropy_coef=0.01,
                              aggregation=aggregation, normalizer=normalizer)
    value = value_objective(batch["values"][idx], batch["old_values"][idx], batch["returns"][idx],
                            batch["mask"][idx], clip_range=0.2, vf_coef=0.5, aggregation=aggregation,
                            normalizer=normalizer)
    return policy.objective, value.objective


def _grads(batch):
    grads = [batch[k].grad.clone() for k in ("logp", "entropy", "values")]
    for k in ("logp", "entropy", "values"):
        batch[k].grad = None
    return grads


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_sum_to_the_minibatch_loss_and_gradient(aggregation, micro):
    batch = _random_minibatch()
    everything = torch.arange(8)
    full_policy, full_value = _objectives(batch, everything, aggregation, normalizer=None)
    (full_policy + full_value).backward()
    full_grads = _grads(batch)

    normalizer = aggregation_normalizer(batch["mask"], aggregation)
    policy_sum, value_sum = 0.0, 0.0
    for start in range(0, 8, micro):
        policy, value = _objectives(batch, everything[start:start + micro], aggregation, normalizer)
        # as the stage does: each half backpropagated on its own, gradients accumulated
        policy.backward()
        value.backward()
        policy_sum, value_sum = policy_sum + policy.detach(), value_sum + value.detach()
    assert_close(policy_sum, full_policy.detach(), rtol=0, atol=1e-6)
    assert_close(value_sum, full_value.detach(), rtol=0, atol=1e-6)
    for micro_grad, full_grad in zip(_grads(batch), full_grads):
        assert_close(micro_grad, full_grad, rtol=0, atol=1e-6)


def test_aggregation_normalizer_counts_tokens_or_non_empty_rows():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregation_normalizer(mask, "token_mean").item() == 4.0
    assert aggregation_normalizer(mask, "seq_mean").item() == 2.0
    # an all-padding minibatch divides by 1: loss 0, not NaN
    empty = torch.zeros(2, 3)
    assert aggregation_normalizer(empty, "token_mean").item() == 1.0
    assert aggregate(torch.ones(2, 3), empty, "token_mean", aggregation_normalizer(empty, "token_mean")).item() == 0.0


def test_row_share_weighting_of_micro_batch_means_is_not_the_token_mean():
    # What the PPO stage did: micro-batch token means weighted by their share of rows. Row 0 has one
    # token of loss 1, row 1 three tokens of loss 0: the token mean is 1/4 = 0.25, but with
    # micro-batches of one row the weighting gives 0.5*1 + 0.5*0 = 0.5, a per-sequence mean.
    per_token = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    full = aggregate(per_token, mask, "token_mean")
    row_share = sum(aggregate(per_token[i:i + 1], mask[i:i + 1], "token_mean") * 0.5 for i in range(2))
    exact = sum(aggregate(per_token[i:i + 1], mask[i:i + 1], "token_mean", normalizer=4.0) for i in range(2))
    assert_close(full, torch.tensor(0.25), rtol=0, atol=1e-6)
    assert_close(row_share, torch.tensor(0.5), rtol=0, atol=1e-6)
    assert_close(exact, full, rtol=0, atol=1e-6)
    # the same on the ragged random minibatch's policy objective, for every micro-batch size
    batch = _random_minibatch()
    everything = torch.arange(8)
    full = _objectives(batch, everything, "token_mean", None)[0]
    for micro in (1, 2, 4):
        old = sum(_objectives(batch, everything[s:s + micro], "token_mean", None)[0] * micro / 8
                  for s in range(0, 8, micro))
        assert abs(old - full) > 0.01 * abs(full)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_default_normalizer_is_the_batch_own_count(aggregation):
    batch = _random_minibatch(seed=1)
    mask = batch["mask"]
    per_token = torch.randn(8, 6)
    # today's reduction, written out
    if aggregation == "token_mean":
        today = masked_mean(per_token, mask)
    else:
        today = masked_mean(masked_mean(per_token, mask, dim=-1), mask.bool().any(dim=-1))
    assert torch.equal(aggregate(per_token, mask, aggregation), today)
    own = aggregate(per_token, mask, aggregation, normalizer=aggregation_normalizer(mask, aggregation))
    assert_close(own, today, rtol=0, atol=1e-6)
    # the losses with normalizer=None are exactly those without the argument
    args = (batch["logp"], batch["old_logp"], batch["advantages"], mask, 0.2, aggregation)
    assert torch.equal(ppo_policy_loss(*args).loss, ppo_policy_loss(*args, normalizer=None).loss)
    vargs = (batch["values"], batch["old_values"], batch["returns"], mask, 0.2, aggregation)
    assert torch.equal(clipped_value_loss(*vargs).loss, clipped_value_loss(*vargs, normalizer=None).loss)
    policy = ppo_policy_loss(*args, normalizer=aggregation_normalizer(mask, aggregation))
    assert_close(policy.loss, ppo_policy_loss(*args).loss, rtol=0, atol=1e-6)
