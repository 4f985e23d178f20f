"""The human-in-the-loop pipelines as written out by launch/loops.py: which step starts from what,
which labels each model trains on, and the reports' arithmetic. No step is run here (the slow
tests test_iterated_rlhf.py and test_feedback_loop*.py run real ones)."""

from __future__ import annotations

import json

import pytest

from lightrlhf.errors import ConfigValueError
from lightrlhf.launch.loops import ActiveSelection, IteratedRLHF


def iterated(**kw) -> IteratedRLHF:
    spec = dict(rounds=3, pairs_per_round=10, prompts_per_round=20, selection="disagreement", sft=["stage=sft"],
                sample_pairs=["stage=sample_pairs"], label=["stage=label"], rm=["stage=rm"], ppo=["stage=ppo"])
    return IteratedRLHF(**{**spec, **kw})


def overrides(steps, name: str) -> list[str]:
    return next(s.overrides for s in steps if s.name == name)


def value(steps, name: str, key: str) -> str:
    found = [o.split("=", 1)[1] for o in overrides(steps, name) if o.startswith(key + "=")]
    assert len(found) == 1, (name, key, overrides(steps, name))
    return found[0]


def test_continued_rounds_start_from_the_previous_policy_and_train_the_reward_model_on_it():
    steps = iterated(ppo_from="previous").steps()
    assert [s.name for s in steps] == ["sft"] + [f"{k}_r{n}" for n in (1, 2, 3) for k in ("pairs", "labels", "rm", "ppo")]
    assert value(steps, "ppo_r1", "policy.init") == "{sft}/export"
    assert value(steps, "rm_r1", "model.name_or_path") == "{sft}/export"
    for n in (2, 3):
        start = f"{{ppo_r{n - 1}}}/export"
        # the policy, its KL reference and the reward ensemble's base are the last round's policy
        assert value(steps, f"ppo_r{n}", "policy.init") == start
        assert value(steps, f"rm_r{n}", "model.name_or_path") == start
        assert value(steps, f"ppo_r{n}", "reward.path") == f"{{rm_r{n}}}/export"
        assert value(steps, f"pairs_r{n}", "policy.init") == start
        assert value(steps, f"pairs_r{n}", "stage.reward_model") == f"{{rm_r{n - 1}}}/export"
        assert value(steps, f"labels_r{n}", "stage.previous") == f"{{labels_r{n - 1}}}"
        assert value(steps, f"pairs_r{n}", "stage.first_prompt") == str((n - 1) * 20)  # fresh prompts each round


def test_rounds_from_sft_keep_the_sft_model_as_start_and_base():
    steps = iterated(ppo_from="sft").steps()
    for n in (1, 2, 3):
        assert value(steps, f"ppo_r{n}", "policy.init") == "{sft}/export"
        assert value(steps, f"rm_r{n}", "model.name_or_path") == "{sft}/export"
    assert value(steps, "pairs_r3", "policy.init") == "{ppo_r2}/export"  # the candidates still follow the policy


def test_a_wrong_start_is_refused_naming_the_key():
    with pytest.raises(ConfigValueError, match="ppo_from"):
        iterated(ppo_from="last")


def test_the_rounds_report_takes_sft_gold_from_round_one_and_says_whether_gold_rose(tmp_path):
    loop = iterated(ppo_from="previous")
    golds = {1: (0.5, 1.0), 2: (1.0, 1.2), 3: (1.2, 1.1)}  # (start, end): round 3 falls
    results = {f"ppo_r{n}": {"metrics": {"eval/gold_score_initial": a, "eval/gold_score": b, "eval/kl": 1.0}}
               for n, (a, b) in golds.items()}
    results.update({f"labels_r{n}": {"metrics": {"labels/total_pairs": 10 * n}} for n in (1, 2, 3)})
    lines = loop.report(tmp_path, results)
    points = json.loads((tmp_path / "rounds.json").read_text())
    assert points["sft_gold"] == 0.5 and points["ppo_from"] == "previous"
    assert [r["start_gold"] for r in points["rounds"]] == [0.5, 1.0, 1.2]
    assert [r["labels_total"] for r in points["rounds"]] == [10, 20, 30]
    assert points["gold_rises_every_round"] is False and lines[-1].endswith("no")
    results["ppo_r3"]["metrics"]["eval/gold_score"] = 1.3
    loop.report(tmp_path, results)
    assert json.loads((tmp_path / "rounds.json").read_text())["gold_rises_every_round"] is True


def active(**kw) -> ActiveSelection:
    spec = dict(seeds=[0], rules=["random", "disagreement"], seed_pairs=10, budget=40, pool_prompts=50,
                sft=["stage=sft"], pool=["stage=sample_pairs"], label=["stage=label"], ensemble=["stage=rm"],
                select=["stage=sample_pairs"], rm=["stage=rm"])
    return ActiveSelection(**{**spec, **kw})


def test_one_batch_chooses_the_whole_budget_with_the_seed_set_ensemble():
    steps = active().steps()
    assert value(steps, "select_disagreement_s0", "stage.budget") == "30"
    assert value(steps, "select_disagreement_s0", "stage.reward_model") == "{ensemble_s0}/export"
    assert value(steps, "labels_disagreement_s0", "stage.previous") == "{seed_labels_s0}"
    assert value(steps, "rm_disagreement_s0", "data.path") == "{labels_disagreement_s0}/prefs.jsonl"


def test_batches_retrain_the_ensemble_on_every_label_so_far_before_choosing_again():
    steps = active(batches=3, budget=42).steps()  # 32 chosen: 11 + 11 + 10
    names = [s.name for s in steps]
    # random needs no model: one batch, unsuffixed
    assert value(steps, "select_random_s0", "stage.budget") == "32"
    assert not any(n.startswith("ensemble_random") for n in names)
    budgets = [value(steps, f"select_disagreement_s0_b{b}", "stage.budget") for b in (1, 2, 3)]
    assert budgets == ["11", "11", "10"]
    assert [value(steps, f"select_disagreement_s0_b{b}", "stage.reward_model") for b in (1, 2, 3)] == [
        "{ensemble_s0}/export", "{ensemble_disagreement_s0_b1}/export", "{ensemble_disagreement_s0_b2}/export"]
    assert value(steps, "ensemble_disagreement_s0_b2", "data.path") == "{labels_disagreement_s0_b2}/prefs.jsonl"
    assert "ensemble_disagreement_s0_b3" not in names  # the last batch's labels go to the reward model only
    # never ask a pair twice: each batch excludes the seed set and every earlier batch
    assert value(steps, "select_disagreement_s0_b3", "stage.exclude") == (
        "[{pool_s0}/candidates.jsonl,{select_disagreement_s0_b1}/candidates.jsonl,"
        "{select_disagreement_s0_b2}/candidates.jsonl]")
    assert [value(steps, f"labels_disagreement_s0_b{b}", "stage.previous") for b in (1, 2, 3)] == [
        "{seed_labels_s0}", "{labels_disagreement_s0_b1}", "{labels_disagreement_s0_b2}"]
    assert value(steps, "rm_disagreement_s0", "data.path") == "{labels_disagreement_s0_b3}/prefs.jsonl"
    ids = [value(steps, f"select_disagreement_s0_b{b}", "stage.id_prefix") for b in (1, 2, 3)]
    assert len(set(ids)) == 3
    # every step name is unique and every {reference} names an earlier step
    assert len(set(names)) == len(names)
    for i, step in enumerate(steps):
        for ref in (part.split("}")[0] for o in step.overrides for part in o.split("{")[1:]):
            assert ref in names[:i], (step.name, ref)


def test_the_active_report_weights_batch_figures_by_batch_size(tmp_path):
    loop = active(batches=2, budget=40)  # 30 chosen: 15 + 15
    results = {"rm_random_s0": {"metrics": {"val/gold_accuracy": 0.70}},
               "rm_disagreement_s0": {"metrics": {"val/gold_accuracy": 0.75}},
               "select_random_s0": {"metrics": {"pairs/gold_gap_mean": 0.6}},
               "labels_random_s0": {"metrics": {"labels/gold_agreement": 0.8, "labels/total_pairs": 40}},
               "select_disagreement_s0_b1": {"metrics": {"pairs/gold_gap_mean": 0.4}},
               "select_disagreement_s0_b2": {"metrics": {"pairs/gold_gap_mean": 0.2}},
               "labels_disagreement_s0_b1": {"metrics": {"labels/gold_agreement": 0.9, "labels/total_pairs": 25}},
               "labels_disagreement_s0_b2": {"metrics": {"labels/gold_agreement": 0.7, "labels/total_pairs": 40}},
               "ensemble_disagreement_s0_b1": {"metrics": {"val/gold_accuracy": 0.66}}}
    lines = loop.report(tmp_path, results)
    point = json.loads((tmp_path / "active_selection.json").read_text())["seeds"][0]["disagreement"]
    assert point["labels"] == 40 and point["pairs_gold_gap"] == pytest.approx(0.3)
    assert point["label_gold_agreement"] == pytest.approx(0.8) and point["batch_ensembles_gold_accuracy"] == [0.66]
    assert "disagreement beats random in 1/1 seeds" in lines


def test_the_heldout_pool_is_sampled_once_and_scored_by_every_reward_model():
    steps = active(seeds=[0, 1], batches=2, heldout=["stage=sample_pairs", "data.path.split=validation"]).steps()
    names = [s.name for s in steps]
    assert names.count("heldout_pool") == 1 and names.index("heldout_pool") == 1  # right after SFT, for all seeds
    pool = next(s for s in steps if s.name == "heldout_pool")
    assert pool.group == "heldout" and "data.path.split=validation" in pool.overrides and not pool.fixed
    assert value(steps, "heldout_pool", "policy.init") == "{sft}/export"
    for seed in (0, 1):
        for name, model in ((f"heldout_ensemble_s{seed}", f"ensemble_s{seed}"),
                            (f"heldout_random_s{seed}", f"rm_random_s{seed}"),
                            (f"heldout_disagreement_s{seed}", f"rm_disagreement_s{seed}")):
            assert value(steps, name, "stage.reward_model") == f"{{{model}}}/export"
            assert value(steps, name, "stage.pool") == "{heldout_pool}/pool.jsonl"
            assert names.index(name) > names.index(model)
    assert not any(n.startswith("heldout") for n in (s.name for s in active().steps()))  # off by default


def test_the_report_compares_the_rules_on_both_heldout_sets(tmp_path):
    loop = active(seeds=[0, 1], heldout=["stage=sample_pairs"])
    results = {"heldout_pool": {"metrics": {"pairs/pool_prompts": 512.0}}}
    # (demonstrator pairs, policy pairs): disagreement loses seed 1 on the first and wins both on the second
    for seed, figures in ((0, {"random": (0.70, 0.76), "disagreement": (0.75, 0.78)}),
                          (1, {"random": (0.80, 0.77), "disagreement": (0.79, 0.79)})):
        for rule, (demo, policy) in figures.items():
            results[f"rm_{rule}_s{seed}"] = {"metrics": {"val/gold_accuracy": demo}}
            results[f"heldout_{rule}_s{seed}"] = {"metrics": {"pairs/gold_accuracy_pool": policy,
                                                              "pairs/pool_prompts": 512.0,
                                                              "pairs/gold_decided_pool": 3000.0}}
    lines = loop.report(tmp_path, results)
    summary = json.loads((tmp_path / "active_selection.json").read_text())["summary"]
    assert summary["gold_accuracy"]["disagreement"]["beats_baseline"] == "1/2"
    assert summary["policy_pairs_gold_accuracy"]["disagreement"]["beats_baseline"] == "2/2"
    assert summary["policy_pairs_gold_accuracy"]["random"]["mean"] == pytest.approx(0.765)
    assert lines.count("disagreement beats random in 1/2 seeds") == 1
    assert lines.count("disagreement beats random in 2/2 seeds") == 1
    assert any("512 held-out prompts (3000 pairs" in line for line in lines)


def test_more_batches_than_chosen_labels_is_refused():
    with pytest.raises(ConfigValueError, match="batches"):
        active(batches=31)


def test_a_wrong_loop_value_is_one_line_naming_the_full_key(tmp_path):
    from conftest import train_cli

    done = train_cli(["experiment=active_selection", "pipeline.loop.batches=0", f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 2
    assert "pipeline.loop.batches" in done.stderr and "Traceback" not in done.stderr
