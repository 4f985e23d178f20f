"""Losses for training a reward model on pairwise human preferences."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightrlhf.validation import one_of


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Bradley-Terry loss, P(chosen > rejected) = sigmoid(r_c - r_r), with three optional terms.

    d = r_c - r_r - margin
    loss = -(1 - eps) log sigmoid(d) - eps log sigmoid(-d) + center_coef * (r_c + r_r)^2

    margin: a per-pair margin the chosen reward must beat the rejected one by, larger for pairs
      the annotators rated as clearly different (Touvron et al. 2023, Llama 2, sec. 3.2.2).
    label_smoothing eps: the conservative BT loss for noisy labels; each label is taken to be
      flipped with probability eps, so the loss stops pushing d up once sigmoid(d) = 1 - eps.
    center_coef: reward centring, pulls r_c + r_r towards 0, so rewards stay near zero mean
      rather than drifting by a constant BT cannot see (Eisenstein et al. 2023, "Helping or
      Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking").
    chosen_rewards, rejected_rewards, margin: [B]. Returns a scalar, or [B] for reduction="none".
    """
    one_of("reduction", reduction, ("mean", "none"))
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin
    # detail: logsigmoid, not log(sigmoid(d)): sigmoid underflows to 0 for d < -88 in float32.
    loss = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss.mean() if reduction == "mean" else loss


def soft_bradley_terry_loss(return_a: Tensor, return_b: Tensor, target_a: Tensor,
                            reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Cross-entropy of Bradley-Terry's P(a > b) = sigmoid(R_a - R_b) against a soft label:

    loss = -y log sigmoid(R_a - R_b) - (1 - y) log sigmoid(R_b - R_a)

    y = 1 when a was preferred, 0 when b was, 1/2 for a tie: Christiano et al. 2017, eq. 1, where a
    pair judged equally good puts half its mass on each clip. R_a, R_b: [B] predicted returns of the
    two clips (sums of per-step rewards), target_a: [B] in [0, 1]. Returns a scalar or [B].
    """
    one_of("reduction", reduction, ("mean", "none"))
    d = return_a - return_b
    loss = -target_a * F.logsigmoid(d) - (1 - target_a) * F.logsigmoid(-d)
    return loss.mean() if reduction == "mean" else loss
