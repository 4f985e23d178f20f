"""Direct preference optimisation and its variants: losses on per-sequence log-probabilities.

Every loss here reads four numbers per pair -- the summed (or averaged, see IPO) log-probabilities
of the chosen and the rejected response under the policy and under the frozen reference -- and
compares the policy's log-ratio margin with the reference's:

    h = (log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))

    sigmoid  L = -log sigmoid(beta * h)                      Rafailov et al. 2023 (DPO), eq. 7
    cDPO     L = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
                 (label smoothing eps: each label is taken as flipped with probability eps;
                 Mitchell 2023, "A note on DPO with noisy preferences")
    ipo      L = (h - 1 / (2 * beta))^2                      Azar et al. 2023 (IPO), eq. 17
    hinge    L = max(0, 1 - beta * h)                        Zhao et al. 2023 (SLiC-HF), eq. 3
                 (SLiC's margin delta written as 1/beta, as TRL writes it)

Implicit rewards (Rafailov et al. 2023, sec. 5): r(x, y) = beta * (log pi(y|x) - log ref(y|x)).
With a fresh LoRA adapter the policy *is* the reference, so h = 0, every reward is 0 and the
sigmoid loss is exactly log 2 at step 0.

IPO and length: IPO's target 1/(2 beta) is a margin in nats per *pair*; with summed log-probs
the same beta would mean a different target for 5-token and 50-token answers. The published
IPO implementations (TRL's `loss_type="ipo"`, the authors' reference code) therefore feed IPO the
log-probs *averaged* over response tokens. The functions here take whatever they are given; the
DPO stage (stages/dpo.py) averages for `ipo` and sums for `sigmoid` and `hinge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightrlhf.validation import one_of, positive, require

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_dpo_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """The one place the loss settings are checked (config errors name the parameter)."""
    one_of("loss_type", loss_type, LOSS_TYPES)
    positive("beta", beta)
    require(0.0 <= label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {label_smoothing!r}")
    require(label_smoothing == 0.0 or loss_type == "sigmoid", "label_smoothing",
            f"applies to loss_type 'sigmoid' only (conservative DPO), got {label_smoothing!r} with {loss_type!r}")


@dataclass
class DPOLossResult:
    losses: Tensor  # [B] per-pair loss
    chosen_rewards: Tensor  # [B] beta * (log pi(y_c) - log ref(y_c)), detached
    rejected_rewards: Tensor  # [B] beta * (log pi(y_r) - log ref(y_r)), detached

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0) -> DPOLossResult:
    """The per-pair loss of `loss_type` and the implicit rewards (module docstring). All inputs [B]."""
    check_dpo_settings(loss_type, beta, label_smoothing)
    # detail: the reference is a constant; detach it so a caller passing reference log-probs computed
    # with grad enabled cannot push gradient into the reference.
    reference_chosen, reference_rejected = reference_chosen.detach(), reference_rejected.detach()
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        # detail: logsigmoid, not log(sigmoid(.)): sigmoid underflows to 0 for arguments below -88.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return DPOLossResult(losses, chosen_rewards, rejected_rewards)


def dpo_metrics(result: DPOLossResult, policy_chosen: Tensor, policy_rejected: Tensor) -> dict[str, Tensor]:
    """Means over the pairs, under the names DPO users know (TRL's DPOTrainer logs the same):
    rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}. accuracies counts a pair
    as right when its chosen reward is strictly larger (a tie, as at step 0, is not right)."""
    margins = result.chosen_rewards - result.rejected_rewards
    return {
        "rewards/chosen": result.chosen_rewards.mean(),
        "rewards/rejected": result.rejected_rewards.mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracies": (margins > 0).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
