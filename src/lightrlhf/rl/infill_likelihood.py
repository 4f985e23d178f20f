"""The log-likelihood of an infill under a masked LM, which has no exact closed form.

A causal LM factorises log pi(y | x) = sum_t log pi(y_t | x, y_<t) exactly. A masked LM (BERT, a
masked-diffusion LM) gives only conditionals of masked positions given the unmasked ones, and its
samples come from an iterative sampler (mask-predict) whose marginal probability nobody can compute.
Reward-weighted fine-tuning needs a stand-in for log pi(y | x) that it can raise on good infills. Two:

one_step (d1 / diffu-GRPO; Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language Models
via Reinforcement Learning", Sect. 3.2): mask the whole response and score every response token at once,

    log pi(y | x) ~= sum_{i=1}^{L} log p_theta(y_i | x, [MASK]^L)

one forward pass, deterministic; a mean-field approximation (it ignores that the sampler conditions
later tokens on earlier ones), so raising it teaches the first, all-mask step of mask-predict most.

elbo (the masked-diffusion evidence lower bound; Shi et al. 2024, "Simplified and Generalized Masked
Diffusion", eq. 7; Sahoo et al. 2024, MDLM; Nie et al. 2025, LLaDA, eq. 3 and its conditional form
eq. 5): draw a masking ratio t ~ U(0, 1], mask each response position with probability t (y_t), and

    log pi(y | x) >= E_{t, y_t} [ (1 / t) * sum_{i: y_t^i = [MASK]} log p_theta(y_i | x, y_t) ]

one draw of (t, y_t) per response and step is an unbiased estimate of the bound. It trains the model
at every masking level, which is every stage of mask-predict, at the price of noise (the 1/t weight).
`min_ratio` keeps t away from 0, where 1/t would explode (LLaDA's epsilon).

Both return [B] per-response estimates, and `token_terms` the [B, L] terms whose sum over the slot is
that estimate -- the form `rl.reward_weighted.weighted_sequence_nll` takes, with the whole slot (L
positions, a constant) as each row's token count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightrlhf.rl.logprobs import token_logprobs


def one_step_terms(logits: Tensor, targets: Tensor) -> Tensor:
    """[B, L] log p(y_i | x, [MASK]^L): `logits` [B, L, V] of the slot from the forward where all of it is
    masked, `targets` [B, L] the infill's tokens."""
    return token_logprobs(logits, targets)


def elbo_terms(logits: Tensor, targets: Tensor, masked: Tensor, ratio: Tensor) -> Tensor:
    """[B, L] (1 / t) log p(y_i | x, y_t) at the masked positions, 0 elsewhere: `logits` [B, L, V] of the
    slot from the forward on y_t, `masked` [B, L] bool where y_t holds [MASK], `ratio` [B] the t of each row."""
    # detail: select with `where`, not multiply: an unmasked position's log-prob may be -inf (a banned token)
    return torch.where(masked, token_logprobs(logits, targets), 0.0) / ratio[:, None]


def draw_masking(rows: int, length: int, generator: torch.Generator | None,
                 min_ratio: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(masked [rows, length] bool, t [rows]): per row t ~ U(min_ratio, 1], each position masked with
    probability t, independently."""
    ratio = min_ratio + (1 - min_ratio) * torch.rand(rows, generator=generator)
    masked = torch.rand(rows, length, generator=generator) < ratio[:, None]
    return masked, ratio


def sequence_estimate(terms: Tensor) -> Tensor:
    """[B] the estimate of log pi(y | x): the terms summed over the slot."""
    return terms.sum(1)
