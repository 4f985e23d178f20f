"""The scorer: composite score, the reward-function contract, normalisation and shaping."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from lightrlhf.errors import UserError
from lightrlhf.rewards.functions import contains, length_words
from lightrlhf.rewards.scorer import Scorer
from lightrlhf.rewards.spec import Component, NormalizeSpec, RewardSpec


def samples(texts: list[str]):
    return SimpleNamespace(sequences=torch.zeros(len(texts), 1), attention_mask=torch.ones(len(texts), 1),
                           prompts=["p"] * len(texts), raw_prompts=["p"] * len(texts), texts=texts)


def test_composite_score_weights_the_reward_model_and_each_function():
    spec = RewardSpec(path="some/rm", weight=0.5, components={
        "words": Component(length_words, weight=-0.1),
        "polite": Component(functools.partial(contains, pattern="please", reward=2.0), weight=1.0)})
    scorer = Scorer(spec, reward_model=lambda s: torch.tensor([1.0, -1.0, 3.0]))
    total, parts = scorer.score(samples(["a b", "please c d e", "x"]))
    assert set(parts) == {"reward_model", "words", "polite"}
    assert parts["words"].tolist() == [2.0, 4.0, 1.0] and parts["polite"].tolist() == [0.0, 2.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([0.5 - 0.2, -0.5 - 0.4 + 2.0, 1.5 - 0.1]))


def test_a_reward_model_path_without_a_model_is_a_bug_not_a_silent_zero():
    with pytest.raises(ValueError, match="no reward model"):
        Scorer(RewardSpec(path="some/rm"))


def _wrong_count(prompts, completions):
    return [1.0] * (len(completions) - 1)


def _nan(prompts, completions):
    return [0.0, math.nan]


def _text(prompts, completions):
    return ["good", "bad"]


def _scalar(prompts, completions):
    return 1.0


def _inf_tensor(prompts, completions):
    return torch.tensor([1.0, math.inf])


@pytest.mark.parametrize("fn, message", [
    (_wrong_count, r"reward.components.f \(test_scorer._wrong_count\): returned 1 values for 2 completions"),
    (_nan, r"reward.components.f \(test_scorer._nan\): value 1 is nan for completion 'y'"),
    (_text, r"reward.components.f \(test_scorer._text\): value 0 is 'good' \(str\), not a number"),
    (_scalar, r"reward.components.f \(test_scorer._scalar\): returned float, not a list of numbers"),
    (_inf_tensor, r"reward.components.f \(test_scorer._inf_tensor\): value 1 is inf"),
])
def test_a_reward_function_that_breaks_the_contract_is_one_line_naming_it(fn, message):
    scorer = Scorer(RewardSpec(path=None, components={"f": Component(fn)}))
    with pytest.raises(UserError, match=message) as raised:
        scorer.score(samples(["x", "y"]))
    assert "\n" not in str(raised.value)


def test_a_partial_is_named_by_the_function_it_wraps():
    broken = functools.partial(_wrong_count)
    with pytest.raises(UserError, match=r"\(test_scorer._wrong_count\)"):
        Scorer(RewardSpec(path=None, components={"f": Component(broken)})).score(samples(["x", "y"]))


def test_normalisation_is_frozen_after_calibration_unless_update_is_on():
    spec = RewardSpec(path=None, components={"w": Component(length_words)}, clip=None)
    frozen = Scorer(spec)
    frozen.calibrate(torch.tensor([0.0, 4.0]))  # mean 2, population std 2
    frozen.observe(torch.tensor([100.0, 200.0]))  # training scores do not move the units ...
    assert frozen.normalizer.mean == 2.0 and frozen.normalizer.count == 2
    torch.testing.assert_close(frozen.shape(torch.tensor([6.0]), torch.tensor([True])), torch.tensor([2.0]))
    moving = Scorer(RewardSpec(path=None, components={"w": Component(length_words)}, clip=None,
                               normalize=NormalizeSpec(update=True)))
    moving.calibrate(torch.tensor([0.0, 4.0]))
    moving.observe(torch.tensor([6.0, 6.0]))  # ... unless normalize.update=true
    assert moving.normalizer.count == 4 and moving.normalizer.mean == 4.0  # (0 + 4 + 6 + 6) / 4
    restored = Scorer(spec)
    restored.load_state_dict(frozen.state_dict())
    assert restored.normalizer.state_dict() == frozen.normalizer.state_dict()
