import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.errors import ConfigValueError
from lightrlhf.rl import dpo_loss, dpo_metrics, sequence_logprobs

# Two pairs, beta = 0.5. Log-probs of the policy (pi) and reference (ref):
#   pair 0: pi_c = -2, pi_r = -3, ref_c = -2.5, ref_r = -2 -> h = (-2 + 3) - (-2.5 + 2) = 1 + 0.5 = 1.5
#   pair 1: pi_c = -3, pi_r = -2, ref_c = -3.5, ref_r = -2 -> h = (-3 + 2) - (-3.5 + 2) = -1 + 1.5 = 0.5
# so beta * h = 0.75 and 0.25.
BETA = 0.5
PI_C, PI_R = torch.tensor([-2.0, -3.0]), torch.tensor([-3.0, -2.0])
REF_C, REF_R = torch.tensor([-2.5, -3.5]), torch.tensor([-2.0, -2.0])


def _loss(loss_type="sigmoid", label_smoothing=0.0, pi_c=PI_C, pi_r=PI_R):
    return dpo_loss(pi_c, pi_r, REF_C, REF_R, beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing)


def test_sigmoid_loss_by_hand():
    # -log sigmoid(x) = log(1 + e^-x): log(1 + e^-0.75) = log(1.472367) = 0.386871
    #                                  log(1 + e^-0.25) = log(1.778801) = 0.575939
    out = _loss("sigmoid")
    assert_close(out.losses, torch.tensor([0.386871, 0.575939]), rtol=0, atol=1e-6)
    assert_close(out.loss, torch.tensor((0.386871 + 0.575939) / 2), rtol=0, atol=1e-6)


def test_conservative_dpo_label_smoothing_by_hand():
    # eps = 0.1: 0.9 * log(1 + e^-0.75) + 0.1 * log(1 + e^0.75) = 0.9 * 0.386871 + 0.1 * 1.136871 = 0.461871
    #            0.9 * log(1 + e^-0.25) + 0.1 * log(1 + e^0.25) = 0.9 * 0.575939 + 0.1 * 0.825939 = 0.600939
    out = _loss("sigmoid", label_smoothing=0.1)
    assert_close(out.losses, torch.tensor([0.461871, 0.600939]), rtol=0, atol=1e-6)


def test_label_smoothing_zero_is_the_sigmoid_loss():
    assert torch.equal(_loss("sigmoid", 0.0).losses, _loss("sigmoid").losses)
    # and it equals -log sigmoid(beta * h) computed directly
    h = (PI_C - PI_R) - (REF_C - REF_R)
    assert_close(_loss("sigmoid", 0.0).losses, -torch.log(torch.sigmoid(BETA * h)), rtol=0, atol=1e-6)


def test_ipo_loss_by_hand():
    # (h - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1: (1.5 - 1)^2 = 0.25 ; (0.5 - 1)^2 = 0.25
    assert_close(_loss("ipo").losses, torch.tensor([0.25, 0.25]), rtol=0, atol=1e-6)


def test_hinge_loss_by_hand():
    # max(0, 1 - beta * h): 1 - 0.75 = 0.25 ; 1 - 0.25 = 0.75 ; and a pair with beta * h = 2.5 is at 0
    assert_close(_loss("hinge").losses, torch.tensor([0.25, 0.75]), rtol=0, atol=1e-6)
    far = dpo_loss(torch.tensor([2.0]), torch.tensor([-3.0]), torch.tensor([0.0]), torch.tensor([0.0]), BETA, "hinge")
    assert far.losses.item() == 0.0  # beta * h = 0.5 * 5 = 2.5 > 1


def test_implicit_rewards_and_metrics_by_hand():
    out = _loss("sigmoid")
    # chosen: 0.5 * (-2 + 2.5) = 0.25 ; 0.5 * (-3 + 3.5) = 0.25
    # rejected: 0.5 * (-3 + 2) = -0.5 ; 0.5 * (-2 + 2) = 0
    assert_close(out.chosen_rewards, torch.tensor([0.25, 0.25]))
    assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.0]))
    m = {k: v.item() for k, v in dpo_metrics(out, PI_C, PI_R).items()}
    # margins 0.75 and 0.25: mean 0.5, both right; logps means (-2 - 3) / 2 and (-3 - 2) / 2
    assert m == pytest.approx({"rewards/chosen": 0.25, "rewards/rejected": -0.25, "rewards/margins": 0.5,
                               "rewards/accuracies": 1.0, "logps/chosen": -2.5, "logps/rejected": -2.5})


def _gradients(loss_type, pi_c=PI_C, pi_r=PI_R):
    chosen, rejected = pi_c.clone().requires_grad_(), pi_r.clone().requires_grad_()
    _loss(loss_type, pi_c=chosen, pi_r=rejected).loss.backward()
    return chosen.grad, rejected.grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_gradients_raise_chosen_and_lower_rejected(loss_type):
    chosen, rejected = _gradients(loss_type)
    assert (chosen < 0).all() and (rejected > 0).all()  # descent raises log pi(y_c), lowers log pi(y_r)
    assert_close(chosen, -rejected)


def test_sigmoid_gradient_by_hand():
    # dL/d pi_c = -beta * sigmoid(-beta * h) / B: -0.5 * sigmoid(-0.75) / 2 = -0.5 * 0.320821 / 2 = -0.080205
    chosen, _ = _gradients("sigmoid")
    assert chosen[0].item() == pytest.approx(-0.080205, abs=1e-6)


def test_ipo_gradient_pulls_the_margin_to_its_target_from_both_sides():
    # h = 1.5 is above the target 1: descent lowers the margin; h = 0.5 is below: it raises it
    chosen, rejected = _gradients("ipo")
    assert chosen[0] > 0 and rejected[0] < 0
    assert chosen[1] < 0 and rejected[1] > 0
    # dL/d pi_c = 2 (h - 1) / B: 2 * 0.5 / 2 = 0.5 ; 2 * -0.5 / 2 = -0.5
    assert_close(chosen, torch.tensor([0.5, -0.5]))


def test_the_reference_gets_no_gradient():
    ref = REF_C.clone().requires_grad_()
    dpo_loss(PI_C.clone().requires_grad_(), PI_R, ref, REF_R, BETA).loss.backward()
    assert ref.grad is None


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_policy_equal_to_reference_gives_zero_rewards(loss_type):
    out = dpo_loss(REF_C, REF_R, REF_C, REF_R, BETA, loss_type)
    assert torch.equal(out.chosen_rewards, torch.zeros(2)) and torch.equal(out.rejected_rewards, torch.zeros(2))
    expected = {"sigmoid": math.log(2), "ipo": (0.0 - 1.0) ** 2, "hinge": 1.0}[loss_type]
    assert_close(out.losses, torch.full((2,), expected))


@pytest.mark.parametrize("kwargs,param", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"beta": 0.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
])
def test_bad_settings_name_the_parameter(kwargs, param):
    args = {"beta": BETA, "loss_type": "sigmoid", "label_smoothing": 0.0, **kwargs}
    with pytest.raises(ConfigValueError) as error:
        dpo_loss(PI_C, PI_R, REF_C, REF_R, **args)
    assert error.value.param == param


def test_sequence_logprobs_by_hand():
    # V = 4, logits: uniform at t = 0, log-counts [1, 2, 3, 2] (p = [1, 2, 3, 2] / 8) at t = 1 and t = 2
    counts = [0.0, math.log(2), math.log(3), math.log(2)]
    logits = torch.tensor([[[0.0] * 4, counts, counts, [0.0] * 4]])  # [1, T=4, V]
    ids = torch.tensor([[0, 1, 2, 3]])
    # scored: tokens 1, 2, 3, predicted at t = 0, 1, 2: log(1/4) + log(3/8) + log(2/8)
    #       = -1.386294 - 0.980829 - 1.386294 = -3.753418
    total, count = sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1, 1]]))
    assert total.item() == pytest.approx(-3.753418, abs=1e-5) and count.item() == 3
    # only the last two (a response after a two-token prompt): -0.980829 - 1.386294 = -2.367124
    total, count = sequence_logprobs(logits, ids, torch.tensor([[0, 0, 1, 1]]))
    assert total.item() == pytest.approx(-2.367124, abs=1e-5) and count.item() == 2
