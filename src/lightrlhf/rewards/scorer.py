"""The scorer: what every online method (PPO, GRPO, RLOO, best-of-n, RAFT) optimises, in one part.

    score(x, y) = w_rm * RM(x, y) + sum_i w_i * f_i(x, y)                 (composite, raw units)
    s = clip((score - mu) / sigma, -c, c) - eos_penalty * [no EOS]         (shaped, rl/shaping.py)

RM is a reward model (a frozen adapter on the policy's base, or a separate model fed re-tokenised
text); each f_i is a Python function `f(prompts, completions) -> list[float]` (rewards/functions.py
has a few; any importable callable works, see RewardSpec). A function's answer is checked: one
finite number per completion, or a one-line error naming the function -- never a silent broadcast
of a short list or a NaN that poisons the run three steps later.

mu and sigma are the running statistics of the composite score (`calibrate`): by default measured
on the initial (SFT) policy's samples and then frozen (`normalize.update=false`), so every seed and
every beta sees rewards in the same units -- standard deviations of the SFT policy's score.

An ensemble reward model (`stage=rm stage.ensemble=K`) answers K member scores per response, and
`reward.ensemble.aggregate` makes them one RM (rl/ensemble.py; Coste et al. 2023):

    mean         RM = 1/K sum_k r_k                                    (raw members; the default)
    min          RM = m_bar + s_bar * min_k z_k                        (worst case, WCO)
    uncertainty  RM = m_bar + s_bar * (mean_k z_k - lambda std_k z_k)  (uncertainty-weighted, UWO)

with z_k = (r_k - m_k) / s_k, each member standardised by its own mean and std on the initial
policy's samples (`calibrate_initial`, frozen then and checkpointed), and m_bar, s_bar the average
of those, so RM stays in the members' units. `score` returns RM as the component `reward_model`
and beside it, not terms of the score, `reward_model_std` (the members' std: of the raw members for
mean, s_bar * std_k z_k otherwise) and, for min and uncertainty, `reward_model_mean` (their mean,
m_bar + s_bar * mean_k z_k), all in the same units: the stages log every component
(`reward/components/<name>`), so a run shows the aggregate, the mean and the spread per batch.
`member_scores` / `mean_and_std` give each member's raw composite score and their spread (the
Python terms are the same for every member, so the spread is w_rm times the reward model's); active
selection (stage=sample_pairs) ranks by those.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightrlhf.errors import ConfigError, UserError
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl.ensemble import ensemble_mean_std, member_statistics, standardised_aggregate
from lightrlhf.rl.normalize import RunningMeanStd
from lightrlhf.rl.shaping import shape_scores


class Samples(Protocol):
    """What a scorer reads of a batch of responses (a `Rollout` is one)."""

    sequences: Tensor
    attention_mask: Tensor
    prompts: list[str]
    raw_prompts: list
    texts: list[str]


# [N] scores, or [K, N] for the K members of an ensemble
RewardModelFn = Callable[[Samples], Tensor]
SPREAD = "reward_model_std"  # the ensemble's std, returned beside the terms (not one of them)
MEMBERS_MEAN = "reward_model_mean"  # the ensemble's mean, beside an aggregate that is not the mean
MEMBER_STATISTICS = "reward_member_statistics"  # the key of the members' frozen statistics in a checkpoint
log = logging.getLogger(__name__)


def function_name(fn: Callable) -> str:
    target = getattr(fn, "func", fn)  # a functools.partial from `_partial_: true`
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def checked_values(name: str, fn: Callable, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
    """Call a reward function and hold it to its contract: one finite number per completion."""
    where = f"reward.components.{name} ({function_name(fn)})"
    values = fn(list(prompts), list(completions))
    if isinstance(values, Tensor):
        values = values.detach().flatten().tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise UserError(f"{where}: returned {type(values).__name__}, not a list of numbers")
    if len(values) != len(completions):
        raise UserError(f"{where}: returned {len(values)} values for {len(completions)} completions "
                        "(one number per completion is required)")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"{where}: value {i} is {value!r} ({type(value).__name__}), not a number")
        if not math.isfinite(float(value)):
            raise UserError(f"{where}: value {i} is {value} for completion {completions[i]!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


@dataclass
class Measurement:
    """What the scorer reads of a batch of N responses before combining it: the reward model's [K, N]
    member scores (K = 1 for a single model; None without one) and each Python term's [N] values."""

    size: int
    reward_members: Tensor | None
    terms: dict[str, Tensor]


class Scorer:
    def __init__(self, spec: RewardSpec, reward_model: RewardModelFn | None = None) -> None:
        if spec.path is not None and reward_model is None:
            raise ValueError("reward.path is set but no reward model was given to the scorer")
        self.spec, self.reward_model = spec, reward_model
        self.normalizer = RunningMeanStd()
        # [K] each member's mean and std on the initial policy's samples (only where the aggregate standardises)
        self.member_means: Tensor | None = None
        self.member_stds: Tensor | None = None

    @torch.no_grad()
    def score(self, samples: Samples) -> tuple[Tensor, dict[str, Tensor]]:
        """(composite score [N], each term [N] unweighted) in raw units; with an ensemble the reward
        model's term is the members' aggregate, and `reward_model_std` their spread (not a term)."""
        return self.combine(self.measure(samples))

    @torch.no_grad()
    def measure(self, samples: Samples) -> Measurement:
        """Run the reward model and the reward functions on a batch; `combine` makes the score of it."""
        rewards = None
        if self.reward_model is not None:
            rewards = self.reward_model(samples).float()
            rewards = rewards if rewards.dim() == 2 else rewards.unsqueeze(0)
            self._check_ensemble(rewards.shape[0])
        terms = {name: checked_values(name, component.fn, samples.prompts, samples.texts)
                 for name, component in self.spec.components.items()}
        return Measurement(len(samples.texts), rewards, terms)

    def combine(self, measured: Measurement) -> tuple[Tensor, dict[str, Tensor]]:
        """(composite score [N], components) of a measured batch (see `score` and the module docstring)."""
        rewards = measured.reward_members
        if rewards is None or not self.spec.ensemble.standardises:
            # the members' mean of each member's composite score, computed as it always was (bit for bit)
            components: dict[str, Tensor] = {}
            if rewards is not None:
                components["reward_model"], components[SPREAD] = ensemble_mean_std(rewards)  # unweighted
                if rewards.shape[0] < 2:
                    del components[SPREAD]
            components.update(measured.terms)
            return self._member_composites(measured).mean(0), components
        means, stds = self._member_statistics(rewards.shape[0])
        aggregate, mean, std = standardised_aggregate(rewards, means, stds, self.spec.ensemble.aggregate,
                                                      self.spec.ensemble.uncertainty_coef)
        components = {"reward_model": aggregate, MEMBERS_MEAN: mean, SPREAD: std, **measured.terms}
        total = torch.zeros(measured.size) + self.spec.weight * aggregate
        for name, component in self.spec.components.items():
            total = total + component.weight * measured.terms[name]
        return total, components

    @torch.no_grad()
    def member_scores(self, samples: Samples) -> Tensor:
        """[K, N] the composite score with each member of the reward model in turn (K = 1 without an
        ensemble), raw: not standardised, whatever `reward.ensemble.aggregate` says."""
        return self._member_composites(self.measure(samples))

    @torch.no_grad()
    def mean_and_std(self, samples: Samples) -> tuple[Tensor, Tensor]:
        """([N], [N]) mean and std over the members of the composite score (std 0 without an ensemble)."""
        return ensemble_mean_std(self.member_scores(samples))

    def _member_composites(self, measured: Measurement) -> Tensor:
        members = torch.zeros(1, measured.size)
        if measured.reward_members is not None:
            members = members + self.spec.weight * measured.reward_members
        for name, component in self.spec.components.items():
            members = members + component.weight * measured.terms[name]
        return members

    def _check_ensemble(self, size: int) -> None:
        if self.spec.ensemble.standardises and size < 2:
            raise ConfigError("reward.ensemble.aggregate",
                              f"{self.spec.ensemble.aggregate!r} combines the members of an ensemble reward model, "
                              f"and reward.path={self.spec.path} has one member (train one with stage=rm "
                              "stage.ensemble=K, K >= 2; with one member min and uncertainty would be its plain score)")

    def _member_statistics(self, size: int) -> tuple[Tensor, Tensor]:
        if self.member_means is None or self.member_stds is None:
            raise ConfigError("reward.ensemble.aggregate",
                              f"{self.spec.ensemble.aggregate!r} standardises each member by its statistics on the "
                              "initial policy's samples, and none were measured (a run's checkpoint from "
                              "aggregate=mean cannot be resumed with another aggregate)")
        if len(self.member_means) != size:
            raise ConfigError("reward.path", f"the reward model has {size} members, but the statistics measured "
                                             f"at the start of the run are for {len(self.member_means)}")
        return self.member_means, self.member_stds

    # -- units: the initial policy's samples -----------------------------------------------------
    def calibrate_members(self, measured: Sequence[Measurement]) -> None:
        """Freeze each member's mean and std over these batches (the initial policy's samples), when the
        aggregate standardises the members; otherwise nothing to do."""
        if not self.spec.ensemble.standardises or not measured or measured[0].reward_members is None:
            return
        self.member_means, self.member_stds = member_statistics(torch.cat([m.reward_members for m in measured], 1))
        log.info("reward ensemble (aggregate=%s): members' means %s, stds %s on %d calibration samples",
                 self.spec.ensemble.aggregate, [round(v, 4) for v in self.member_means.tolist()],
                 [round(v, 4) for v in self.member_stds.tolist()], sum(m.reward_members.shape[1] for m in measured))

    def calibrate_initial(self, measured: Sequence[Measurement]) -> Tensor:
        """The initial policy's batches set the units: each member's statistics (`calibrate_members`),
        then the composite score's (`calibrate`). Returns their composite scores [sum of N]."""
        self.calibrate_members(measured)
        scores = torch.cat([self.combine(m)[0] for m in measured])
        self.calibrate(scores)
        return scores

    def calibrate(self, scores: Tensor) -> None:
        """Merge scores into the normalisation statistics (when normalisation is on)."""
        if self.spec.normalize.enabled:
            self.normalizer.update(scores)

    def observe(self, scores: Tensor) -> None:
        """Called with every training batch's scores: keeps adapting mu, sigma when `normalize.update`
        (the members' statistics stay frozen)."""
        if self.spec.normalize.update:
            self.calibrate(scores)

    def shape(self, scores: Tensor, ended_with_eos: Tensor) -> Tensor:
        normalized = self.normalizer.normalize(scores) if self.spec.normalize.enabled else scores.clone()
        return shape_scores(normalized, ended_with_eos, self.spec.clip, self.spec.missing_eos_penalty)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers; the members' statistics only where they were measured."""
        state: dict[str, Any] = {"normalizer": self.normalizer.state_dict()}
        if self.member_means is not None and self.member_stds is not None:
            state[MEMBER_STATISTICS] = {"mean": self.member_means.tolist(), "std": self.member_stds.tolist()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        members = state.get(MEMBER_STATISTICS)
        if members is not None:
            self.member_means = torch.tensor(members["mean"], dtype=torch.float64)
            self.member_stds = torch.tensor(members["std"], dtype=torch.float64)
