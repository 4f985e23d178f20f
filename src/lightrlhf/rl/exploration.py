"""Epsilon-greedy exploration for a discrete policy, as a policy of its own.

With probability epsilon the action is drawn uniformly instead of from the policy, so the actions come
from the mixture mu(a|s) = (1 - eps) pi(a|s) + eps / |A| (Sutton & Barto 2018, sec. 2.2; the "seed"
exploration of Christiano et al. 2017's Atari agents). PPO then treats mu as the policy: the rollout
stores log mu(a|s) and the update's ratio is mu_new / mu_old, so the clipped objective stays exact for
the data it was given and its gradient flows into pi through mu.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def epsilon_greedy_logprobs(logits: Tensor, actions: Tensor, epsilon: float) -> Tensor:
    """log mu(a|s) = log((1 - eps) softmax(z)_a + eps / n),  n = logits.shape[-1].

    logits: [..., n]; actions: [...] long. eps = 0 gives log pi(a|s) exactly (log_softmax). The
    mixture is taken in log space, logaddexp(log(1 - eps) + log pi_a, log(eps / n)), so a policy
    probability that underflows does not give log 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    if epsilon == 0:
        return logp
    n = logits.shape[-1]
    return torch.logaddexp(logp + math.log1p(-epsilon), torch.full_like(logp, math.log(epsilon / n)))


def epsilon_greedy_sample(logits: Tensor, epsilon: float, generator: torch.Generator) -> Tensor:
    """Actions drawn from mu: the policy's sample, replaced by a uniform one with probability eps."""
    probs = torch.softmax(logits.float(), dim=-1)
    actions = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if epsilon == 0:
        return actions
    explore = torch.rand(actions.shape, generator=generator) < epsilon
    uniform = torch.randint(0, logits.shape[-1], actions.shape, generator=generator)
    return torch.where(explore, uniform, actions)


def linear_decay(start: float, end: float, progress: float) -> float:
    """start + (end - start) * min(progress, 1): an exploration rate annealed over a fraction of training."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)
