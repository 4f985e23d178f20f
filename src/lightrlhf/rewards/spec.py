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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lightrlhf.validation import non_negative, positive, require

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
class RewardSpec:
    """The `reward` block of a PPO config (see module docstring)."""

    path: str | None = None  # reward-model export; None = components only
    weight: float = 1.0  # weight of the reward model's score in the composite
    components: dict[str, Component] = field(default_factory=dict)
    normalize: NormalizeSpec = field(default_factory=NormalizeSpec)
    clip: float | None = 10.0  # clip the shaped score to [-clip, clip]
    missing_eos_penalty: float = 1.0  # subtracted from the shaped score of responses that hit max_new_tokens

    def __post_init__(self) -> None:
        require(self.path is not None or bool(self.components), "path",
                "is required (a reward-model export) unless reward.components defines the reward")
        if self.clip is not None:
            positive("clip", self.clip)
        non_negative("missing_eos_penalty", self.missing_eos_penalty)
