import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import kl_abs, kl_k1, kl_k2, kl_k3, kl_penalty

# logr = ref_logp - logp = [-0.5, 1, 0]
LOGP = torch.tensor([-1.0, -2.0, -0.5])
REF_LOGP = torch.tensor([-1.5, -1.0, -0.5])


def test_estimators_by_hand():
    # k1 = -logr = [0.5, -1, 0]
    assert_close(kl_k1(LOGP, REF_LOGP), torch.tensor([0.5, -1.0, 0.0]), rtol=0, atol=1e-6)
    # k2 = 0.5 logr^2 = [0.125, 0.5, 0]
    assert_close(kl_k2(LOGP, REF_LOGP), torch.tensor([0.125, 0.5, 0.0]), rtol=0, atol=1e-6)
    # k3 = e^logr - 1 - logr: e^-0.5 - 1 + 0.5 = 0.106531 ; e - 1 - 1 = 0.718282 ; 0
    assert_close(kl_k3(LOGP, REF_LOGP), torch.tensor([0.106531, 0.718282, 0.0]), rtol=0, atol=1e-6)
    # abs = |logp - ref_logp| = [0.5, 1, 0]
    assert_close(kl_abs(LOGP, REF_LOGP), torch.tensor([0.5, 1.0, 0.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,fn", [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3), ("abs", kl_abs)])
def test_kl_penalty_dispatches_by_name(name, fn):
    assert_close(kl_penalty(LOGP, REF_LOGP, name), fn(LOGP, REF_LOGP), rtol=0, atol=0)


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(LOGP, REF_LOGP, "k4")


def test_k1_and_k3_are_unbiased_k2_is_not():
    # pi = [1/2, 1/2], pi_ref = [1/4, 3/4]
    # KL(pi || pi_ref) = 1/2 log 2 + 1/2 log(2/3) = 0.5 * (0.693147 - 0.405465) = 0.143841
    # The expectation over y ~ pi is exact here: average the estimator over both tokens.
    logp = torch.tensor([math.log(0.5), math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25), math.log(0.75)])
    kl = torch.tensor(0.143841)
    assert_close(kl_k1(logp, ref_logp).mean(), kl, rtol=0, atol=1e-5)
    assert_close(kl_k3(logp, ref_logp).mean(), kl, rtol=0, atol=1e-5)
    # k2: 0.5 * (log^2 2 + log^2 (2/3)) / 2 = 0.25 * (0.480453 + 0.164402) = 0.161214
    assert_close(kl_k2(logp, ref_logp).mean(), torch.tensor(0.161214), rtol=0, atol=1e-5)


def test_k3_is_non_negative_where_k1_is_negative():
    # token 1 above: k1 = -1 but k3 = 0.718282
    assert kl_k1(LOGP, REF_LOGP)[1] < 0
    assert (kl_k3(LOGP, REF_LOGP) >= 0).all()
