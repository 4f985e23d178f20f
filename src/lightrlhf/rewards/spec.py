"""The `reward` block of an online method's config: what the scorer (rewards/scorer.py) computes.

    score(x, y) = w_rm * RM(x, y) + sum_i w_i * f_i(x, y)             (composite score)
    s = clip((score - mu) / sigma, -c, c) - eos_penalty * [no EOS]      (shaped, added at the last token)

A component `f_i` is any Python callable `f(prompts: list[str], completions: list[str]) -> list[float]`
named by `_target_` in the config (with `_partial_: true` when it takes extra settings), so a
rule-based check, a unit test runner or a second reward model composes with the main one. Each
component is logged apart (`reward/components/<name>`), so a researcher sees which term moves.

Normalisation: mu and sigma are the running mean and standard deviation of the composite score.
By default they are measured on rollouts of the *initial* (SFT) policy and then frozen
(`normalize.update=false`): every run, seed and beta then sees the reward in the same units --
standard deviations of the SFT policy's score -- which is what makes one beta behave the same
across seeds. `update=true` keeps adapting them (a moving target for the value function).

Ensembles (`ensemble`): a reward model exported by `stage=rm stage.ensemble=K` answers K member
scores, and `ensemble.aggregate` says how they make RM (Coste et al. 2023, rl/ensemble.py):
`mean` (their plain mean, as every ensemble was scored before), `min` (worst case, Coste's WCO) or
`uncertainty` (mean - uncertainty_coef * std, Coste's UWO with the std for their variance). For
`min` and `uncertainty` each member is first standardised by its own mean and std on the initial
policy's samples (frozen then, like mu and sigma), because Bradley-Terry leaves each member's
constant free; mu and sigma are then measured on the aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from lightrlhf.rl.ensemble import ENSEMBLE_AGGREGATES
from lightrlhf.validation import non_negative, one_of, positive, require

TextReward = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class Component:
    """One weighted term of the composite score."""

    fn: TextReward
    weight: float = 1.0


@dataclass(frozen=True)
class NormalizeSpec:
    enabled: bool = True
    init_rollouts: int = 4  # batches of the initial policy's rollouts that set mu and sigma
    update: bool = False  # keep updating mu and sigma during training

    def __post_init__(self) -> None:
        non_negative("init_rollouts", self.init_rollouts)


@dataclass(frozen=True)
class EnsembleSpec:
    """How an ensemble reward model's K member scores become the one reward-model term (see module docstring)."""

    aggregate: str = "mean"  # mean, min (worst case, WCO) or uncertainty (mean - uncertainty_coef * std, UWO)
    # lambda of `uncertainty`: how many standard deviations of the members' disagreement below their mean;
    # 1 is about as cautious as the minimum of 4-5 members (E[min of K standard normals]: -1.03 at K=4, -1.16 at 5)
    uncertainty_coef: float = 1.0

    def __post_init__(self) -> None:
        one_of("aggregate", self.aggregate, ENSEMBLE_AGGREGATES)
        require(math.isfinite(self.uncertainty_coef), "uncertainty_coef",
                f"must be a finite number, got {self.uncertainty_coef!r}")
        non_negative("uncertainty_coef", self.uncertainty_coef)

    @property
    def standardises(self) -> bool:
        """Whether the members are standardised before aggregating: for the minimum and the std, which the
        members' free constants would otherwise distort; the mean is linear, so they only shift it by a
        constant that the score's normalisation removes, and it stays the raw members' mean."""
        return self.aggregate != "mean"


@dataclass(frozen=True)
class RewardSpec:
    """The `reward` block of a PPO config (see module docstring)."""

    path: str | None = None  # reward-model export; None = components only
    weight: float = 1.0  # weight of the reward model's score in the composite
    components: dict[str, Component] = field(default_factory=dict)
    normalize: NormalizeSpec = field(default_factory=NormalizeSpec)
    clip: float | None = 10.0  # clip the shaped score to [-clip, clip]
    missing_eos_penalty: float = 1.0  # subtracted from the shaped score of responses that hit max_new_tokens
    ensemble: EnsembleSpec = field(default_factory=EnsembleSpec)  # how an ensemble reward model's members combine

    def __post_init__(self) -> None:
        require(self.path is not None or bool(self.components), "path",
                "is required (a reward-model export) unless reward.components defines the reward")
        require(self.path is not None or not self.ensemble.standardises, "ensemble.aggregate",
                f"{self.ensemble.aggregate!r} combines the members of an ensemble reward model, and reward.path "
                "is null (the components alone); use mean or set reward.path")
        if self.clip is not None:
            positive("clip", self.clip)
        non_negative("missing_eos_penalty", self.missing_eos_penalty)
