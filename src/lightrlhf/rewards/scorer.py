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

An ensemble reward model (`stage=rm stage.ensemble=K`) answers K member scores per response. RM is
then their mean, and `member_scores` / `mean_and_std` give each member's composite score and the
spread (std over members; the Python terms are the same for every member, so the spread is
w_rm times the reward model's). `score` also returns the reward model's own std as the component
`reward_model_std` (unweighted, as every term), which is not a term of the score: the stages log it
beside the terms.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightrlhf.errors import UserError
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl.ensemble import ensemble_mean_std
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


class Scorer:
    def __init__(self, spec: RewardSpec, reward_model: RewardModelFn | None = None) -> None:
        if spec.path is not None and reward_model is None:
            raise ValueError("reward.path is set but no reward model was given to the scorer")
        self.spec, self.reward_model = spec, reward_model
        self.normalizer = RunningMeanStd()

    @torch.no_grad()
    def score(self, samples: Samples) -> tuple[Tensor, dict[str, Tensor]]:
        """(composite score [N], each term [N] unweighted) in raw units; with an ensemble the reward
        model's term is the members' mean, and `reward_model_std` their spread (not a term)."""
        members, components = self._members_and_terms(samples)
        total = members.mean(0)
        if SPREAD in components and members.shape[0] < 2:
            del components[SPREAD]
        return total, components

    @torch.no_grad()
    def member_scores(self, samples: Samples) -> Tensor:
        """[K, N] the composite score with each member of the reward model in turn (K = 1 without an ensemble)."""
        return self._members_and_terms(samples)[0]

    @torch.no_grad()
    def mean_and_std(self, samples: Samples) -> tuple[Tensor, Tensor]:
        """([N], [N]) mean and std over the members of the composite score (std 0 without an ensemble)."""
        return ensemble_mean_std(self.member_scores(samples))

    def _members_and_terms(self, samples: Samples) -> tuple[Tensor, dict[str, Tensor]]:
        components: dict[str, Tensor] = {}
        members = torch.zeros(1, len(samples.texts))
        if self.reward_model is not None:
            rewards = self.reward_model(samples).float()
            rewards = rewards if rewards.dim() == 2 else rewards.unsqueeze(0)
            components["reward_model"], components[SPREAD] = ensemble_mean_std(rewards)  # unweighted, as every term
            members = members + self.spec.weight * rewards
        for name, component in self.spec.components.items():
            components[name] = checked_values(name, component.fn, samples.prompts, samples.texts)
            members = members + component.weight * components[name]
        return members, components

    def calibrate(self, scores: Tensor) -> None:
        """Merge scores into the normalisation statistics (when normalisation is on)."""
        if self.spec.normalize.enabled:
            self.normalizer.update(scores)

    def observe(self, scores: Tensor) -> None:
        """Called with every training batch's scores: keeps adapting mu, sigma when `normalize.update`."""
        if self.spec.normalize.update:
            self.calibrate(scores)

    def shape(self, scores: Tensor, ended_with_eos: Tensor) -> Tensor:
        normalized = self.normalizer.normalize(scores) if self.spec.normalize.enabled else scores.clone()
        return shape_scores(normalized, ended_with_eos, self.spec.clip, self.spec.missing_eos_penalty)

    def state_dict(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
