"""Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi.

Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
With logr = log pi_ref(y) - log pi(y) and y ~ pi:

    k1  = -logr                  unbiased, high variance, negative on some tokens
    k2  = 0.5 * logr^2           biased (little when pi and pi_ref are close), always >= 0
    k3  = (exp(logr) - 1) - logr unbiased and always >= 0 (a control variate added to k1)
    abs = |logr|                 biased, >= 0; TRL's kl_penalty="abs"

These are estimators of KL's *value*. Used as a loss and differentiated through log pi with the
samples held fixed, k3 has the wrong gradient: d k3 / d theta = (1 - pi_ref/pi) grad log pi, whose
expectation under y ~ pi is -E_{pi_ref}[grad log pi] = grad KL(pi_ref || pi), the other direction
(Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"). GRPO's loss
(Shao et al. 2024, eq. 3-4) uses k3 that way. `kl_k3_importance_weighted` is the correction.
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


def kl_k3_importance_weighted(logp: Tensor, old_logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3w = rho * k3,  rho = exp(logp - sg(old_logp)): the KL term of a loss, on tokens from pi_old.

    E_{y ~ pi_old}[rho * k3(y)] = E_{y ~ pi}[k3(y)] = KL(pi || pi_ref) for *every* theta, so the
    gradient of the sample mean is an unbiased estimate of grad KL(pi || pi_ref). Per sample:
        grad(rho * k3) = rho * (k3 + 1 - pi_ref/pi) * grad log pi = rho * (log pi - log pi_ref) * grad log pi,
    the score-function gradient of KL. Its value is k3's (rho = 1 on the rollout policy's own
    log-probs: on the first update the value is unchanged, only the gradient is fixed).
    Per token, the states y_<t are held fixed, as for every per-token KL term in RLHF losses.
    """
    rho = torch.exp(logp - old_logp.detach())
    return rho * kl_k3(logp, ref_logp.detach())


def kl_abs(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """|logp - ref_logp|."""
    return (logp - ref_logp).abs()


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "abs": kl_abs}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator) -> Tensor:
    """The named per-token estimator; an unknown name raises ValueError."""
    one_of("estimator", estimator, _ESTIMATORS)
    return _ESTIMATORS[estimator](logp, ref_logp)
