"""experiment=overoptimisation as written out and reported by launch/laboratory.py, on made-up curves
(the steps themselves run, tiny, in the slow test at the end)."""

from __future__ import annotations

import json
import math

import pytest

from lightrlhf.errors import ConfigValueError
from lightrlhf.launch.laboratory import Overoptimisation, kl_tag, ppo_curve, read_scalar_curves


def experiment(**kw) -> Overoptimisation:
    spec = dict(seeds=[0, 1], kl_coefs=[0.0, 0.05], sft=["stage=sft"], rm=["stage=rm"], best_of_n=["stage=best_of_n"],
                ppo=["stage=ppo"])
    return Overoptimisation(**{**spec, **kw})


def test_each_seed_gets_a_proxy_and_every_optimiser_uses_it():
    steps = experiment().steps()
    names = [s.name for s in steps]
    assert names == ["sft", "rm_s0", "rm_s1", "ppo_kl0_s0", "ppo_kl0p05_s0", "ppo_kl0_s1", "ppo_kl0p05_s1",
                     "bon_s0", "bon_s1"]
    by_name = {s.name: s for s in steps}
    # the optimisations run beside each other; the proxies they read are finished before them
    assert [s.name for s in steps if s.concurrent] == names[3:]
    assert "model.name_or_path={sft}/export" in by_name["rm_s1"].overrides
    for name in ("bon_s1", "ppo_kl0_s1", "ppo_kl0p05_s1"):
        assert "reward.path={rm_s1}/export" in by_name[name].overrides
        assert "policy.init={sft}/export" in by_name[name].overrides
        assert by_name[name].fixed == ("seed=1",)
    assert "stage.kl.coef=0.05" in by_name["ppo_kl0p05_s0"].overrides
    assert by_name["ppo_kl0p05_s0"].group == "ppo"


def test_kl_tags_are_step_name_safe_and_must_be_distinct():
    assert (kl_tag(0.0), kl_tag(0.05), kl_tag(1.0)) == ("0", "0p05", "1")
    with pytest.raises(ConfigValueError, match="kl_coefs"):
        experiment(kl_coefs=[0.05, 0.050])
    with pytest.raises(ConfigValueError, match="kl_coefs"):
        experiment(kl_coefs=[-0.1])


def write_curve(tb_dir, points, split_at=None):
    """(rollout, gold, proxy, kl) points as a PPO run logs them; split_at: a second event file from there
    on (a resumed run), repeating the point at split_at with a new value that must win."""
    from torch.utils.tensorboard import SummaryWriter

    parts = [points] if split_at is None else [points[:split_at + 1], points[split_at:]]
    for i, part in enumerate(parts):
        writer = SummaryWriter(str(tb_dir / f"part{i}"))
        for step, gold, proxy, kl in part:
            bump = 0.01 if (i == 1 and step == points[split_at][0]) else 0.0
            writer.add_scalar("eval/gold_score", gold + bump, step)
            writer.add_scalar("eval/reward", proxy, step)
            writer.add_scalar("eval/kl", kl, step)
        writer.close()


GOLD_UP_THEN_DOWN = [(0, 0.5, 0.0, 0.0), (10, 0.9, 2.0, 1.0), (20, 1.1, 4.0, 4.0), (30, 0.8, 6.0, 9.0)]


def test_ppo_curves_come_back_from_tensorboard_as_gains_against_sqrt_kl(tmp_path):
    write_curve(tmp_path / "ppo" / "tb", GOLD_UP_THEN_DOWN, split_at=2)
    curves = read_scalar_curves(tmp_path / "ppo" / "tb", ("eval/gold_score",))
    assert [s for s, _ in curves["eval/gold_score"]] == [0, 10, 20, 30]
    assert curves["eval/gold_score"][2][1] == pytest.approx(1.11)  # the resumed run's value wins
    curve = ppo_curve(tmp_path / "ppo", "ppo_kl0", 0)
    assert curve.d == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert curve.gold == pytest.approx([0.0, 0.4, 0.61, 0.3])
    assert curve.proxy == pytest.approx([0.0, 2.0, 4.0, 6.0])
    summary = curve.summary()
    # Lightning logs the evaluation after r rollouts at step r - 1
    assert summary["gold_peak_at"] == "rollout 21" and summary["gold_drop"] == pytest.approx(0.31)
    assert summary["overoptimised"]


def test_an_evaluation_after_every_rollout_shares_step_0_with_the_initial_one(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step, gold, proxy, kl in [(0, 0.5, 0.0, 0.0), (0, 0.7, 1.0, 0.25), (1, 0.9, 2.0, 1.0)]:
        writer.add_scalar("eval/gold_score", gold, step)
        writer.add_scalar("eval/reward", proxy, step)
        writer.add_scalar("eval/kl", kl, step)
    writer.close()
    initial = {"eval/gold_score_initial": 0.5, "eval/reward_initial": 0.0, "eval/kl_initial": 0.0}
    for record in (initial, None):  # from metrics.json, or (no record) step 0's first value
        curve = ppo_curve(tmp_path, "ppo_kl0", 0, record)
        assert curve.labels == ["start", "rollout 1", "rollout 2"]
        assert curve.d == pytest.approx([0.0, 0.5, 1.0]) and curve.gold == pytest.approx([0.0, 0.2, 0.4])


def test_the_report_fits_both_forms_and_counts_seeds_where_gold_fell_while_the_proxy_rose(tmp_path):
    loop = experiment(seeds=[0], kl_coefs=[0.0])
    write_curve(tmp_path / "ppo_kl0_s0" / "tb", GOLD_UP_THEN_DOWN)
    table = [{"n": n, "reward": 0.1 * math.log(n), "gold_score": 0.5 + d * (0.8 - 0.4 * d), "kl": d * d}
             for n, d in ((1, 0.0), (4, 1.0), (16, 1.5), (64, 2.0), (256, 2.5))]
    results = {"bon_s0": {"table": table}, "rm_s0": {"metrics": {"val/gold_accuracy": 0.8}}}
    lines = loop.report(tmp_path, results)
    report = json.loads((tmp_path / "overoptimisation.json").read_text())
    bon = next(c for c in report["curves"] if c["method"] == "best_of_n")
    assert bon["fits"]["gold"]["alpha"] == pytest.approx(0.8) and bon["fits"]["gold"]["beta"] == pytest.approx(0.4)
    assert bon["fits"]["gold"]["r_squared"] == pytest.approx(1.0)
    assert bon["gold_peak_at"] == "n=4"  # d* = alpha / (2 beta) = 1 and bon["overoptimised"] and bon["rm_gold_accuracy"] == 0.8
    assert report["verdict"] == {"best_of_n": "1/1", "ppo_kl0": "1/1"}
    assert "best_of_n: gold peaked and fell while the proxy rose in 1/1 seeds" in lines
    assert (tmp_path / "overoptimisation.png").stat().st_size > 10_000
    assert (tmp_path / "overoptimisation.md").read_text().count("\n| ") >= 3
    written = read_scalar_curves(tmp_path / "tb", ("overoptimisation/ppo_kl0/seed0/gold",))
    assert [s for s, _ in written["overoptimisation/ppo_kl0/seed0/gold"]] == [0, 1000, 2000, 3000]
    ppo = next(c for c in report["curves"] if c["method"] == "ppo_kl0")
    assert ppo["points"] == ["start", "rollout 11", "rollout 21", "rollout 31"]


def test_a_missing_step_leaves_its_curve_out_instead_of_failing(tmp_path):
    lines = experiment(seeds=[0], kl_coefs=[0.0]).report(tmp_path, {})
    assert json.loads((tmp_path / "overoptimisation.json").read_text())["curves"] == []
    assert "ppo_kl0: gold peaked and fell while the proxy rose in 0/1 seeds" in lines


def test_the_pipeline_runs_the_concurrent_steps_as_processes_and_checks_they_read_no_other(tmp_path):
    from lightrlhf.errors import ConfigError
    from lightrlhf.launch.loops import LoopStep
    from lightrlhf.launch.pipeline import PipelineSpec, Step

    node = {"loop": {"_target_": "lightrlhf.launch.laboratory.Overoptimisation", "seeds": [0], "kl_coefs": [0.0],
                     "sft": ["stage=sft"], "rm": ["stage=rm"], "best_of_n": ["stage=best_of_n"], "ppo": ["stage=ppo"]},
            "parallel": 2}
    spec = PipelineSpec.from_config(node)
    assert [s.name for s in spec.steps if s.runs_beside] == ["ppo_kl0_s0", "bon_s0"]
    assert spec.parallel == 2

    class Reading:  # a loop whose concurrent step reads another concurrent step's directory
        def steps(self):
            return [LoopStep("a", ["stage=sft"], "a", concurrent=True),
                    LoopStep("b", ["model.name_or_path={a}/export"], "b", concurrent=True)]

    with pytest.raises(ConfigError, match="cannot use the directory"):
        PipelineSpec._checked([Step(s.name, s.overrides, s.group, None, s.fixed, s.concurrent)
                               for s in Reading().steps()], node, Reading())


def test_an_ensemble_proxy_and_its_aggregate_reach_the_steps_that_need_them():
    steps = {s.name: s for s in experiment(seeds=[0], ensemble=5, aggregate="min").steps()}
    assert "stage.ensemble=5" in steps["rm_s0"].overrides
    for name in ("bon_s0", "ppo_kl0_s0"):
        assert "reward.ensemble.aggregate=min" in steps[name].overrides
    plain = {s.name: s for s in experiment(seeds=[0]).steps()}
    assert not any("ensemble" in o for s in plain.values() for o in s.overrides)  # the defaults add nothing
    with pytest.raises(ConfigValueError, match="aggregate"):
        experiment(aggregate="min")  # a single reward model has no members to take the minimum of
    with pytest.raises(ConfigValueError, match="aggregate"):
        experiment(ensemble=3, aggregate="median")


@pytest.mark.slow
def test_overoptimisation_run_end_to_end_with_tiny_steps(tmp_path):
    from conftest import train_cli

    run_dir = tmp_path / "lab"
    done = train_cli([
        "experiment=overoptimisation", "pipeline.loop.seeds=[0]", "pipeline.loop.kl_coefs=[0.0]",
        "pipeline.extra.sft=['trainer.max_steps=4','trainer.val_check_interval=4','stage.eval.num_prompts=8']",
        "pipeline.extra.rm=['trainer.max_steps=3','trainer.val_check_interval=3','stage.datamodule.batch_size=8']",
        "pipeline.extra.best_of_n=['stage.n_max=4','stage.num_prompts=4','stage.generation.max_new_tokens=8']",
        "pipeline.extra.ppo=['stage.rollouts=3','trainer.val_check_interval=1','stage.eval.num_prompts=8',"
        "'stage.datamodule.batch_size=8','reward.normalize.init_rollouts=1','stage.generation.max_new_tokens=8']",
        f"hydra.run.dir={run_dir}"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "overoptimisation.json").read_text())
    methods = {c["method"]: c for c in report["curves"]}
    assert set(methods) == {"best_of_n", "ppo_kl0"}
    assert [p for p in methods["best_of_n"]["points"]] == ["n=1", "n=2", "n=4"]
    assert methods["ppo_kl0"]["points"] == ["start", "rollout 1", "rollout 2", "rollout 3"]
    assert methods["ppo_kl0"]["d"][0] == 0.0 and methods["ppo_kl0"]["gold_gain"][0] == 0.0
    assert (run_dir / "overoptimisation.png").stat().st_size > 10_000
    assert "gold peaked and fell while the proxy rose" in (run_dir / "overoptimisation.md").read_text()
