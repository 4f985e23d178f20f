"""Reward-model ensembles: the scorer's mean and std by hand; a trained ensemble's export, loading,
per-member metrics and alignment; PPO's actor-critic reading every member."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rewards.scorer import Scorer
from lightrlhf.rewards.spec import Component, NormalizeSpec, RewardSpec


@dataclass
class Texts:
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[str]
    raw_prompts: list[str]
    texts: list[str]


SAMPLES = Texts(torch.zeros(2, 1), torch.ones(2, 1), ["p", "p"], ["p", "p"], ["ab", "abcd"])


def length(prompts, completions):
    return [float(len(c)) for c in completions]


def test_scorer_mean_and_std_over_members_by_hand():
    # 3 members score two responses: [1, 2], [3, 2], [2, 5]; weight 2 on the reward model, plus 0.5 * length
    members = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    spec = RewardSpec(path="ensemble", weight=2.0, normalize=NormalizeSpec(enabled=False),
                      components={"length": Component(fn=length, weight=0.5)})
    scorer = Scorer(spec, reward_model=lambda samples: members)
    # member composite: 2 * r_k + 0.5 * (2, 4) = [3, 6], [7, 6], [5, 12]
    assert_close(scorer.member_scores(SAMPLES), torch.tensor([[3.0, 6.0], [7.0, 6.0], [5.0, 12.0]]))
    mean, std = scorer.mean_and_std(SAMPLES)
    # response 0: 3, 7, 5 -> mean 5, sample std sqrt((4 + 4 + 0) / 2) = 2 = 2 * the RM's std (1)
    # response 1: 6, 6, 12 -> mean 8, sample std sqrt((4 + 4 + 16) / 2) = sqrt(12) = 2 * sqrt(3)
    assert_close(mean, torch.tensor([5.0, 8.0]))
    assert_close(std, torch.tensor([2.0, math.sqrt(12)]))
    total, components = scorer.score(SAMPLES)
    assert_close(total, mean)
    assert_close(components["reward_model"], torch.tensor([2.0, 3.0]))  # the members' mean, unweighted
    assert_close(components["reward_model_std"], torch.tensor([1.0, math.sqrt(3)]))  # their spread, not a term
    assert_close(components["length"], torch.tensor([2.0, 4.0]))


def test_a_single_reward_model_scores_as_before():
    scorer = Scorer(RewardSpec(path="rm", normalize=NormalizeSpec(enabled=False)),
                    reward_model=lambda samples: torch.tensor([0.25, -1.0]))
    total, components = scorer.score(SAMPLES)
    assert torch.equal(total, torch.tensor([0.25, -1.0])) and set(components) == {"reward_model"}
    assert torch.equal(scorer.mean_and_std(SAMPLES)[1], torch.zeros(2))


def _validation_pairs(run_dir: Path) -> list[dict]:
    from lightrlhf.launch.build import build

    config = json.loads((run_dir / "export" / "lightrlhf.json").read_text())["config"]
    path = build(config["data"]["validation_path"], "data.validation_path")
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_ensemble_export_holds_every_member_and_reproduces_the_logged_metrics(ensemble_run):
    from lightrlhf.models.reward import RewardModel

    export = ensemble_run / "export"
    manifest = json.loads((export / "lightrlhf.json").read_text())
    assert manifest["members"] == ["member0", "member1", "member2"]
    for member in manifest["members"]:
        assert {"adapter_model.safetensors", "score_head.safetensors"} <= {p.name for p in (export / member).iterdir()}
    metrics = json.loads((ensemble_run / "metrics.json").read_text())["metrics"]
    for k in range(3):
        assert {f"val/member{k}/accuracy", f"val/member{k}/loss", f"val/member{k}/gold_accuracy"} <= set(metrics)
    model = RewardModel.from_pretrained(export)
    assert model.ensemble_size == 3
    pairs = _validation_pairs(ensemble_run)
    prompts = [p["prompt"] for p in pairs]
    chosen = model.member_scores(prompts, [p["chosen"] for p in pairs])
    rejected = model.member_scores(prompts, [p["rejected"] for p in pairs])
    assert chosen.shape == (3, len(pairs))
    # the members were trained apart: they do not give the same rewards
    assert (chosen[0] - chosen[1]).abs().mean() > 1e-3
    # the export's reward is the members' mean; its accuracy is the logged one, and each member's too
    assert_close(model.score(prompts[:5], [p["chosen"] for p in pairs[:5]]), chosen[:, :5].mean(0))
    assert (chosen.mean(0) > rejected.mean(0)).float().mean().item() == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    for k in range(3):
        assert (chosen[k] > rejected[k]).float().mean().item() == pytest.approx(metrics[f"val/member{k}/accuracy"],
                                                                              abs=1e-6)
    # the exported heads are aligned: every member has the same mean reward on the held-out answers,
    # and the std over members is the logged val/ensemble/reward_std
    both = torch.cat([chosen, rejected], dim=1)
    assert_close(both.mean(1), both.mean().expand(3), rtol=0, atol=1e-4)
    assert both.std(0).mean().item() == pytest.approx(metrics["val/ensemble/reward_std"], abs=1e-4)
    assert (chosen - rejected).std(0).mean().item() == pytest.approx(metrics["val/ensemble/margin_std"], abs=1e-4)


@pytest.mark.slow
def test_the_actor_critic_scores_with_every_member_on_the_shared_base(ensemble_run, exports, tiny_spec, tiny_tokenizer):
    from lightrlhf.models.actor_critic import PolicySpec, load_actor_critic
    from lightrlhf.models.reward import RewardModel
    from lightrlhf.stages.sample_pairs import text_samples

    spec = RewardSpec(path=str(ensemble_run / "export"), normalize=NormalizeSpec(enabled=False))
    model = load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(init=str(exports / "sft" / "export")), spec,
                              critic=True)
    assert model.shares_reward_base and model.reward_ensemble_size == 3
    assert model.reward_adapters == ["reward_member0", "reward_member1", "reward_member2"]
    prompts, texts = ["explain river rain :"] * 2, ["the river is wet .", "a rain ."]
    samples = text_samples(model.tokenizer, prompts, texts)
    members = Scorer(spec, model.reward_model()).member_scores(samples)
    separate = RewardModel.from_pretrained(ensemble_run / "export").member_scores(prompts, texts)
    assert_close(members, separate, rtol=0, atol=1e-5)
    # the value function starts from the first member
    assert "value_head.linear.weight" in dict(model.named_parameters())


def test_an_ensemble_needs_lora(tmp_path):
    from conftest import SMALL_DEMO, compose

    from lightrlhf.errors import UserError
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    cfg = to_plain(compose(["stage=rm", "data=demo_pref", *SMALL_DEMO, "stage.ensemble=2", "model.lora=null"], tmp_path))
    with pytest.raises(UserError, match="^config stage.ensemble: an ensemble is K LoRA"):
        build_stage(cfg)
