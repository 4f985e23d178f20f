"""Simulated teachers: B-Pref's six scripted labellers (Lee et al. 2021, "B-Pref: Benchmarking
Preference-Based Reinforcement Learning", sec. 3.2), applied to the hidden true reward of two clips.

One model with five knobs; each named teacher turns one of them:

    oracle    perfectly rational: prefers the clip with the larger true return; equal returns are a tie
    noisy     Bradley-Terry: P(a) = exp(beta R_a) / (exp(beta R_a) + exp(beta R_b))  (beta = rationality)
    mistake   the oracle's answer, flipped with probability epsilon
    skip      skips a query when neither clip reaches the skip threshold (both uninformative)
    myopic    discounts the past: R = sum_t gamma^(L-1-t) r_t, the latest steps weigh most
    equal     answers "tie" when |R_a - R_b| is below the equal threshold

The steps run in B-Pref's order: skip, myopic discounting, the rational or Bradley-Terry answer,
mistakes, ties. Thresholds are fractions of the range a clip's return can take, L * (r_max - r_min)
(for CartPole's 0/1 reward and 50-step clips, 0.1 = 5 steps). B-Pref scales them by the mean return of
recent episodes instead, which presumes positive rewards; a fraction of the range also works for
Pendulum's negative ones.

Answers use the labelling page's words ("a", "b", "tie", "skip"; see lightrlhf.feedback), so a person's
labels and a teacher's are interchangeable: both go through `targets_from_choices`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightrlhf.validation import in_range, positive

TEACHERS = ("oracle", "noisy", "mistake", "skip", "myopic", "equal")
# choice -> P(a preferred) for the Bradley-Terry loss; choices not listed carry no comparison
CHOICE_TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass(frozen=True)
class TeacherSpec:
    """B-Pref's scripted teacher. beta: Bradley-Terry rationality, null = perfectly rational. gamma:
    myopic discount (1 = none). mistake: probability of flipping the answer. skip_threshold,
    equal_threshold: fractions of a clip's return range (module docstring); 0 = never."""

    beta: float | None = None
    gamma: float = 1.0
    mistake: float = 0.0
    skip_threshold: float = 0.0
    equal_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.beta is not None:
            positive("beta", self.beta)
        in_range("gamma", self.gamma, 0.0, 1.0)
        in_range("mistake", self.mistake, 0.0, 1.0)
        in_range("skip_threshold", self.skip_threshold, 0.0, 1.0)
        in_range("equal_threshold", self.equal_threshold, 0.0, 1.0)


def scripted_answers(spec: TeacherSpec, rewards_a: Tensor, rewards_b: Tensor, step_reward_range: tuple[float, float],
                     generator: torch.Generator) -> list[str]:
    """The teacher's answer to each of P queries, from the true per-step rewards [P, L] of both clips.

    Random draws (Bradley-Terry, mistakes) come from `generator`, one uniform per query for each, in a
    fixed order, so a run's answers depend on its seed only.
    """
    length = rewards_a.shape[1]
    low, high = step_reward_range
    span = length * (high - low)
    plain_a, plain_b = rewards_a.double().sum(1), rewards_b.double().sum(1)
    # skip: neither clip is informative enough (judged on the undiscounted returns, as B-Pref)
    skipped = torch.maximum(plain_a, plain_b) < length * low + spec.skip_threshold * span if spec.skip_threshold \
        else torch.zeros(len(plain_a), dtype=torch.bool)
    # equal: too close to call (B-Pref compares the undiscounted returns here too)
    tied = (plain_a - plain_b).abs() < spec.equal_threshold * span if spec.equal_threshold \
        else torch.zeros(len(plain_a), dtype=torch.bool)
    # myopic: step t of L weighs gamma^(L-1-t)
    weights = spec.gamma ** torch.arange(length - 1, -1, -1, dtype=torch.float64)
    return_a, return_b = rewards_a.double() @ weights, rewards_b.double() @ weights
    draws_bt = torch.rand(len(return_a), generator=generator, dtype=torch.float64)
    draws_mistake = torch.rand(len(return_a), generator=generator, dtype=torch.float64)
    if spec.beta is None:
        prefers_a = return_a > return_b
        tied = tied | (return_a == return_b)  # a rational teacher does not invent a difference
    else:
        prefers_a = draws_bt < torch.sigmoid(spec.beta * (return_a - return_b))
    prefers_a = torch.where(draws_mistake < spec.mistake, ~prefers_a, prefers_a)
    answers = []
    for skip, tie, a in zip(skipped.tolist(), tied.tolist(), prefers_a.tolist()):
        answers.append("skip" if skip else "tie" if tie else "a" if a else "b")
    return answers


def targets_from_choices(choices: list[str]) -> tuple[Tensor, Tensor]:
    """(P(a preferred) [P], kept [P] bool) from answers; "skip", "both_bad" and anything else unusable
    are not kept (Christiano et al. 2017: incomparable pairs stay out of the data)."""
    targets = torch.tensor([CHOICE_TARGET.get(c, 0.5) for c in choices], dtype=torch.float32)
    kept = torch.tensor([c in CHOICE_TARGET for c in choices], dtype=torch.bool)
    return targets, kept
