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
from lightrlhf.rl.normalize import RunningMeanStd
from lightrlhf.rl.shaping import shape_scores


class Samples(Protocol):
    """What a scorer reads of a batch of responses (a `Rollout` is one)."""

    sequences: Tensor
    attention_mask: Tensor
    prompts: list[str]
    raw_prompts: list
    texts: list[str]


RewardModelFn = Callable[[Samples], Tensor]


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
        """(composite score [N], each term [N] unweighted) in raw units."""
        components: dict[str, Tensor] = {}
        total = torch.zeros(len(samples.texts))
        if self.reward_model is not None:
            components["reward_model"] = self.reward_model(samples).float()
            total = total + self.spec.weight * components["reward_model"]
        for name, component in self.spec.components.items():
            components[name] = checked_values(name, component.fn, samples.prompts, samples.texts)
            total = total + component.weight * components[name]
        return total, components

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
