"""Per-token log-probabilities and entropies of a causal LM's next-token distribution."""

from __future__ import annotations

import torch
from torch import Tensor


def scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in float32. At temperature 1 the logits themselves (x / 1 == x exactly):
    no [B, T, V] copy, and no division in the backward pass."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(y_t) = z[y_t] - logsumexp(z),  z = logits / temperature.

    logits: [B, T, V] (the distribution that produced tokens[:, t] sits at logits[:, t]);
    tokens: [B, T] long. Returns float32 [B, T].
    """
    # detail: upcast first; bf16 keeps 8 bits of mantissa, so logsumexp over a 50k vocabulary in
    # bf16 is off by ~0.1 nats, as large as a PPO step's log-ratio.
    z = scaled(logits, temperature)
    # detail: gather then subtract logsumexp; no [B, T, V] log_softmax tensor is kept for backward.
    gathered = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return gathered - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v,  z = logits / temperature. Returns float32 [B, T].

    This equals -sum_v p_v log p_v, written without taking the log of a probability that may
    underflow to 0.
    """
    z = scaled(logits, temperature)
    probs = torch.softmax(z, dim=-1)
    log_partition = torch.logsumexp(z, dim=-1)
    # detail: a token with probability 0 (logit -inf, e.g. a filtered vocabulary entry) contributes
    # 0, not 0 * -inf = nan.
    z = z.masked_fill(probs == 0, 0)
    return log_partition - (probs * z).sum(dim=-1)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_t m_t log pi(x_t | x_<t), sum_t m_t) per row: a response's log-probability and its length.

    logits: [B, T, V] of a forward over input_ids [B, T]; mask: [B, T], 1 on the tokens to score
    (a response and its EOS; never position 0, which no logit predicts). Returns float32 [B], [B].
    """
    # the distribution that produced token t sits at logits[:, t - 1]
    tokens, scored = input_ids[:, 1:], mask[:, 1:].bool()
    per_token = token_logprobs(logits[:, :-1], tokens)
    # detail: select with `where`, not multiply: a padded position's log-prob may be -inf.
    return torch.where(scored, per_token, 0.0).sum(1), scored.sum(1).float()
