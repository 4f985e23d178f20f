"""Reward-model ensembles as the scorer (reward.ensemble): mean, worst case (WCO) and uncertainty-weighted (UWO)
aggregates of members standardised on the initial policy's samples (Coste et al. 2023), by hand; the default
(mean) scoring exactly as before; one-line errors; the members' statistics through a checkpoint; PPO and
best-of-n on a 3-member ensemble of the demo."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_in_process, scalar_curve, train_cli
from torch.testing import assert_close

from lightrlhf.errors import ConfigError, ConfigValueError
from lightrlhf.rewards.scorer import MEMBER_STATISTICS, Scorer
from lightrlhf.rewards.spec import Component, EnsembleSpec, RewardSpec
from lightrlhf.rl.ensemble import aggregate_members, member_statistics, standardise_members, standardised_aggregate

# Three members scored on two calibration responses: means (1, 12, 7), population stds (1, 2, 3) --
# each its own constant and scale, as Bradley-Terry members trained apart have.
CALIBRATION = torch.tensor([[0.0, 2.0], [10.0, 14.0], [4.0, 10.0]])
# ... and on two responses to aggregate. Standardised, z = (r - m) / s:
#   response 0: (2-1)/1, (16-12)/2, (7-7)/3   = 1, 2, 0 -> mean 1,   min 0, sample std 1
#   response 1: (1-1)/1, (12-12)/2, (13-7)/3  = 0, 0, 2 -> mean 2/3, min 0,
#               sample std sqrt((4/9 + 4/9 + 16/9) / 2) = 2/sqrt(3)
SCORED = torch.tensor([[2.0, 1.0], [16.0, 12.0], [7.0, 13.0]])
LEVEL, SCALE = 20 / 3, 2.0  # the members' average mean (1+12+7)/3 and average std (1+2+3)/3


def texts(*items: str):
    return SimpleNamespace(sequences=torch.zeros(len(items), 1), attention_mask=torch.ones(len(items), 1),
                           prompts=["p"] * len(items), raw_prompts=["p"] * len(items), texts=list(items))


CAL_SAMPLES, SCORED_SAMPLES = texts("a", "bbb"), texts("cc", "dddd")


def ensemble_rm(samples) -> torch.Tensor:
    """A stand-in for an exported 3-member reward model: [3, N] member scores of the texts above."""
    return CALIBRATION if samples.texts == CAL_SAMPLES.texts else SCORED


def length(prompts, completions):
    return [float(len(c)) for c in completions]


# -- the math, by hand -----------------------------------------------------------------------------------
def test_member_statistics_are_each_members_mean_and_population_std():
    means, stds = member_statistics(CALIBRATION)
    assert means.tolist() == [1.0, 12.0, 7.0] and stds.tolist() == [1.0, 2.0, 3.0]
    assert means.dtype == torch.float64


def test_standardised_members_by_hand():
    means, stds = member_statistics(CALIBRATION)
    assert_close(standardise_members(SCORED, means, stds), torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    assert_close(standardise_members(CALIBRATION, means, stds), torch.tensor([[-1.0, 1.0]] * 3))


def test_aggregates_by_hand():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert_close(aggregate_members(z, "mean"), torch.tensor([1.0, 2 / 3]))
    assert_close(aggregate_members(z, "min"), torch.tensor([0.0, 0.0]))
    assert_close(aggregate_members(z, "uncertainty", 0.5), torch.tensor([1.0 - 0.5, 2 / 3 - 0.5 * 2 / math.sqrt(3)]))
    assert_close(aggregate_members(z, "uncertainty", 0.0), aggregate_members(z, "mean"))  # lambda 0: the mean
    one = torch.tensor([[0.25, -1.0]])  # a single member: all three are its score (std 0)
    for aggregate in ("mean", "min", "uncertainty"):
        assert torch.equal(aggregate_members(one, aggregate, 3.0), one[0])
    with pytest.raises(ValueError, match="unknown ensemble aggregate 'max'"):
        aggregate_members(z, "max")


def test_standardised_aggregate_is_in_the_members_average_units():
    means, stds = member_statistics(CALIBRATION)
    worst, mean, std = standardised_aggregate(SCORED, means, stds, "min")
    assert_close(worst, torch.tensor([LEVEL, LEVEL]))  # m_bar + s_bar * 0
    assert_close(mean, torch.tensor([LEVEL + SCALE * 1.0, LEVEL + SCALE * 2 / 3]))  # 26/3, 8
    assert_close(std, torch.tensor([SCALE * 1.0, SCALE * 2 / math.sqrt(3)]))  # 2, 4/sqrt(3)
    cautious, mean_u, std_u = standardised_aggregate(SCORED, means, stds, "uncertainty", 0.5)
    assert_close(cautious, mean_u - 0.5 * std_u)  # UWO: A = mean - lambda * std, in the logged numbers too
    assert_close(cautious, torch.tensor([26 / 3 - 1.0, 8.0 - 2 / math.sqrt(3)]))
    # the raw members' mean (25/3, 26/3) is not the standardised one: their constants and scales differ
    assert not torch.allclose(SCORED.mean(0), mean)
    # members of one scale: the standardised mean is the raw mean (up to rounding)
    same_scale = torch.tensor([[0.0, 2.0], [10.0, 12.0]])
    m, s = member_statistics(same_scale)
    scored = torch.tensor([[1.0, 3.0], [12.0, 9.0]])
    assert_close(standardised_aggregate(scored, m, s, "mean")[0], scored.mean(0))


# -- the scorer --------------------------------------------------------------------------------------
def test_the_default_mean_scores_bit_for_bit_as_before():
    """reward.ensemble.aggregate=mean: what the scorer computed before ensembles could be aggregated otherwise
    (each member's composite score, then their mean), for one member and for three."""
    generator = torch.Generator().manual_seed(0)
    for k in (1, 3):
        members = torch.randn(k, 5, generator=generator)
        spec = RewardSpec(path="rm", weight=0.7, components={"length": Component(length, weight=-0.3)})
        scorer = Scorer(spec, reward_model=lambda samples, m=members: m if k > 1 else m[0])
        samples = texts("a", "bb", "ccc", "dddd", "e")
        before = torch.zeros(1, 5) + 0.7 * members
        before = before + -0.3 * torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0])
        total, components = scorer.score(samples)
        assert torch.equal(total, before.mean(0))
        assert torch.equal(components["reward_model"], members.mean(0))
        assert set(components) == ({"reward_model", "reward_model_std", "length"} if k > 1 else
                                   {"reward_model", "length"})
        assert torch.equal(scorer.calibrate_initial([scorer.measure(samples)]), before.mean(0))
        assert scorer.member_means is None and MEMBER_STATISTICS not in scorer.state_dict()  # checkpoints as before


@pytest.mark.parametrize("aggregate, expected", [
    ("min", [LEVEL, LEVEL]),
    ("uncertainty", [26 / 3 - 2.0, 8.0 - 4 / math.sqrt(3)]),  # lambda = 1 (the default)
])
def test_min_and_uncertainty_standardise_on_the_initial_policy_then_aggregate(aggregate, expected):
    spec = RewardSpec(path="ensemble", weight=2.0, components={"length": Component(length, weight=0.5)},
                      ensemble=EnsembleSpec(aggregate=aggregate))
    scorer = Scorer(spec, reward_model=ensemble_rm)
    calibration = scorer.calibrate_initial([scorer.measure(CAL_SAMPLES)])
    assert scorer.member_means.tolist() == [1.0, 12.0, 7.0] and scorer.member_stds.tolist() == [1.0, 2.0, 3.0]
    # on the calibration responses the standardised members agree (z = -1, 1): A = m_bar + s_bar * (-1, 1)
    assert_close(calibration, 2.0 * torch.tensor([LEVEL - SCALE, LEVEL + SCALE]) + 0.5 * torch.tensor([1.0, 3.0]))
    assert scorer.normalizer.count == 2 and scorer.normalizer.mean == pytest.approx(calibration.mean().item())
    total, components = scorer.score(SCORED_SAMPLES)
    assert_close(components["reward_model"], torch.tensor(expected))  # the term, unweighted
    assert_close(components["reward_model_mean"], torch.tensor([26 / 3, 8.0]))
    assert_close(components["reward_model_std"], torch.tensor([2.0, 4 / math.sqrt(3)]))
    assert_close(total, 2.0 * torch.tensor(expected) + 0.5 * torch.tensor([2.0, 4.0]))
    # scorer.observe never moves the members' units, even when the score's normaliser keeps updating
    scorer.observe(total)
    assert scorer.member_means.tolist() == [1.0, 12.0, 7.0]
    # what active selection ranks by stays the raw members' composite
    assert_close(scorer.member_scores(SCORED_SAMPLES), 2.0 * SCORED + 0.5 * torch.tensor([2.0, 4.0]))


def test_the_members_statistics_survive_a_checkpoint(tmp_path):
    spec = RewardSpec(path="ensemble", ensemble=EnsembleSpec(aggregate="uncertainty", uncertainty_coef=0.5))
    scorer = Scorer(spec, reward_model=ensemble_rm)
    scorer.calibrate_initial([scorer.measure(CAL_SAMPLES)])
    torch.save({"lightrlhf": {**scorer.state_dict(), "rollout_count": 3}}, tmp_path / "state.ckpt")
    state = torch.load(tmp_path / "state.ckpt", weights_only=True)["lightrlhf"]  # as a stage's online state
    resumed = Scorer(spec, reward_model=ensemble_rm)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.member_means, scorer.member_means) and torch.equal(resumed.member_stds,
                                                                                    scorer.member_stds)
    assert resumed.normalizer.state_dict() == scorer.normalizer.state_dict()
    for got, want in zip(resumed.score(SCORED_SAMPLES), scorer.score(SCORED_SAMPLES)):
        assert torch.equal(got, want) if torch.is_tensor(got) else all(torch.equal(got[k], want[k]) for k in want)
    # a checkpoint without them (a run with aggregate=mean) cannot be resumed with min: one line naming the key
    plain = Scorer(spec, reward_model=ensemble_rm)
    plain.load_state_dict({"normalizer": scorer.normalizer.state_dict()})
    with pytest.raises(ConfigError, match=r"^config reward.ensemble.aggregate: 'uncertainty' standardises each "
                                          r"member by its statistics on the initial policy's samples, and none"):
        plain.score(SCORED_SAMPLES)


# -- errors: one line naming the key ------------------------------------------------------------------
def test_min_or_uncertainty_with_a_single_reward_model_is_one_line():
    scorer = Scorer(RewardSpec(path="rm", ensemble=EnsembleSpec(aggregate="min")),
                    reward_model=lambda samples: torch.tensor([0.5, 1.0]))
    with pytest.raises(ConfigError, match=r"^config reward.ensemble.aggregate: 'min' combines the members of an "
                                          r"ensemble reward model, and reward.path=rm has one member") as raised:
        scorer.score(texts("a", "b"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("kwargs, param, message", [
    ({"aggregate": "max"}, "aggregate", "must be one of ['mean', 'min', 'uncertainty'], got 'max'"),
    ({"aggregate": "uncertainty", "uncertainty_coef": -0.5}, "uncertainty_coef", "must be >= 0, got -0.5"),
    ({"aggregate": "uncertainty", "uncertainty_coef": math.inf}, "uncertainty_coef", "must be a finite number"),
])
def test_bad_ensemble_values_name_their_parameter(kwargs, param, message):
    with pytest.raises(ConfigValueError) as raised:
        EnsembleSpec(**kwargs)
    assert raised.value.param == param and raised.value.problem.startswith(message)


def test_min_without_a_reward_model_names_the_key():
    with pytest.raises(ConfigValueError) as raised:
        RewardSpec(path=None, components={"length": Component(length)}, ensemble=EnsembleSpec(aggregate="min"))
    assert raised.value.param == "ensemble.aggregate" and "reward.path is null" in raised.value.problem


def test_a_bad_aggregate_through_the_cli_is_one_line_and_exit_2(exports, tmp_path):
    done = train_cli(["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
                      f"reward.path={exports / 'rm' / 'export'}", "reward.ensemble.aggregate=worst",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["error: config reward.ensemble.aggregate: must be one of ['mean', 'min', "
                                        "'uncertainty'], got 'worst'"]


# -- end to end on the demo: a 3-member ensemble (conftest.ensemble_run) ------------------------------------
def _ppo(exports, ensemble_run, *extra):
    return ["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={ensemble_run / 'export'}", "stage.datamodule.batch_size=8", "stage.eval.num_prompts=16",
            "stage.eval.batch_size=16", "reward.normalize.init_rollouts=1", "trainer.val_check_interval=100",
            "stage.eval.at_start=false", "callbacks.checkpoint.every_n_steps=8", *extra]


@pytest.mark.slow
def test_ppo_with_the_worst_case_of_an_ensemble_logs_it_and_resumes_with_the_members_units(exports, ensemble_run,
                                                                                         tmp_path):
    run_dir = tmp_path / "ppo_min"
    run_in_process(_ppo(exports, ensemble_run, "reward.ensemble.aggregate=min", "stage.rollouts=2"), run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["progress/rollouts"] == 2.0
    aggregate = [v for _, v in scalar_curve(run_dir, "reward/components/reward_model")]
    mean = [v for _, v in scalar_curve(run_dir, "reward/components/reward_model_mean")]
    std = [v for _, v in scalar_curve(run_dir, "reward/components/reward_model_std")]
    assert len(aggregate) == len(mean) == len(std) == 2
    assert all(a < m for a, m in zip(aggregate, mean)) and all(s > 0 for s in std)  # min below mean: members differ
    checkpoint = torch.load(sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1], weights_only=True)
    members = checkpoint["lightrlhf"][MEMBER_STATISTICS]
    assert len(members["mean"]) == len(members["std"]) == 3 and min(members["std"]) > 0
    # resumed for a third rollout: no new calibration, the checkpoint's units (without them the score would fail)
    resumed = train_cli([f"resume={run_dir}", "stage.rollouts=3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "train.log").read_text()  # the resumed run's
    assert "Restored all states" in log and "reward ensemble (aggregate=min)" not in log
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["progress/rollouts"] == 3.0
    assert len(scalar_curve(run_dir, "reward/components/reward_model")) == 3
    again = torch.load(sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1], weights_only=True)
    assert again["lightrlhf"][MEMBER_STATISTICS] == members


@pytest.mark.slow
def test_ppo_with_the_uncertainty_weighted_ensemble_logs_mean_minus_lambda_std(exports, ensemble_run, tmp_path):
    run_dir = tmp_path / "ppo_uwo"
    run_in_process(_ppo(exports, ensemble_run, "reward.ensemble.aggregate=uncertainty",
                        "reward.ensemble.uncertainty_coef=0.5", "stage.rollouts=1"), run_dir)
    aggregate, mean, std = (scalar_curve(run_dir, f"reward/components/{name}")[0][1]
                            for name in ("reward_model", "reward_model_mean", "reward_model_std"))
    assert std > 0 and aggregate == pytest.approx(mean - 0.5 * std, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["min", "uncertainty"])
def test_best_of_n_ranks_by_the_ensembles_aggregate(exports, ensemble_run, tmp_path, aggregate):
    run_dir = tmp_path / f"bon_{aggregate}"
    done = train_cli(["stage=best_of_n", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
                      f"reward.path={ensemble_run / 'export'}", f"reward.ensemble.aggregate={aggregate}",
                      "stage.n_max=4", "stage.num_prompts=8", "stage.batch_size=4",
                      "stage.generation.max_new_tokens=8", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"reward ensemble (aggregate={aggregate}): members' means" in (run_dir / "train.log").read_text()
    table = json.loads((run_dir / "metrics.json").read_text())["table"]
    assert [row["n"] for row in table] == [1, 2, 4]
    for row in table:  # `reward` is the aggregate the draws are ranked by; below the members' mean
        assert row["reward_model_std"] > 0 and row["reward"] < row["reward_model_mean"]
        if aggregate == "uncertainty":  # lambda = 1, and both are averages over the same chosen draws
            assert row["reward"] == pytest.approx(row["reward_model_mean"] - row["reward_model_std"], rel=1e-5)


@pytest.mark.slow
def test_the_masked_lm_stage_reads_every_member_when_the_aggregate_needs_them(ensemble_run):
    from lightrlhf.stages.masked_reward_weighted import reward_model_of

    samples = SimpleNamespace(raw_prompts=["explain river rain :"] * 2, texts=["the river is wet .", "a rain ."])
    export = str(ensemble_run / "export")
    members = reward_model_of(RewardSpec(path=export, ensemble=EnsembleSpec(aggregate="min")))(samples)
    mean = reward_model_of(RewardSpec(path=export))(samples)  # the mean: the export's own score, as before
    assert members.shape == (3, 2) and mean.shape == (2,)
    assert torch.equal(mean, members.mean(0))
