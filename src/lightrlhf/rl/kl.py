"""Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi.

Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
With logr = log pi_ref(y) - log pi(y) and y ~ pi:

    k1  = -logr                  unbiased, high variance, negative on some tokens
    k2  = 0.5 * logr^2           biased (little when pi and pi_ref are close), always >= 0
    k3  = (exp(logr) - 1) - logr unbiased and always >= 0 (a control variate added to k1)
    abs = |logr|                 biased, >= 0; TRL's kl_penalty="abs"
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightrlhf.validation import one_of

KLEstimator = Literal["k1", "k2", "k3", "abs"]


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = -logr = logp - ref_logp."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * logr^2."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (exp(logr) - 1) - logr, non-negative since e^x >= 1 + x."""
    logr = ref_logp - logp
    # expm1 keeps precision when pi and pi_ref are close (logr ~ 0), the usual case.
    return torch.expm1(logr) - logr


def kl_abs(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """|logp - ref_logp|."""
    return (logp - ref_logp).abs()


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "abs": kl_abs}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator) -> Tensor:
    """The named per-token estimator; an unknown name raises ValueError."""
    one_of("estimator", estimator, _ESTIMATORS)
    return _ESTIMATORS[estimator](logp, ref_logp)
