"""The demo task keeps its promises: the targets of `make demo`, and the phenomena it is built to show.

The two longest tests of the suite (minutes each on 2 cores); tests/conftest.py puts each at the head
of one worker's queue so that a parallel run does not end waiting on them.
"""

from __future__ import annotations

import json

import pytest
from conftest import SMALL_DEMO, scalar_curve, train_cli

pytestmark = pytest.mark.slow
# A hang guard, not a speed target: the whole demo takes 137 s on an idle 2-core machine, but
# this machine's speed has been measured to vary 2x between days and 25% within the hour, and in the
# parallel suite it shares the cores with the other worker.
DEMO_TIMEOUT_S = 1800
# As `make demo` runs: threads chosen by the launcher (the CPUs the other test worker leaves free, re-measured
# while training), not pinned to one, so the demo takes the second core once the rest of the suite is done.
AS_MAKE_DEMO = {"OMP_NUM_THREADS": None}


def test_the_default_demo_meets_its_targets_and_resume_skips_finished_stages(tmp_path):
    """`python train.py` as `make demo` runs it, with the targets the framework promises on the demo task:
    the gold score rises untrained -> SFT -> PPO, the reward model ranks held-out pairs like the gold
    scorer >= 90% of the time, PPO gains >= 1.4 standard deviations of the SFT policy's gold scores (the
    README's three seeds: 1.6-1.7; the margin is for the thread count, which follows the machine's load
    and changes the float sums) with its held-out KL within 1.5x its target and no KL alert."""
    run_dir = tmp_path / "demo"
    done = train_cli([f"hydra.run.dir={run_dir}"], timeout=DEMO_TIMEOUT_S, env=AS_MAKE_DEMO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hidden gold score: untrained" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["steps"]) == ["sft", "rm", "ppo"]
    gold = summary["gold_score"]
    assert gold["untrained"] < gold["sft"] < gold["ppo"], gold
    assert gold["ppo_gain_in_sft_std"] >= 1.4, gold
    assert summary["steps"]["rm"]["metrics"]["val/gold_accuracy"] >= 0.90, summary["steps"]["rm"]
    ppo = json.loads((run_dir / "ppo" / "metrics.json").read_text())["metrics"]
    target = 4.0  # conf/stage/ppo.yaml stage.kl.target
    assert ppo["eval/kl"] <= 1.5 * target and ppo.get("alerts/kl_exceeded_count", 0) == 0, ppo
    training_kl = [value for _, value in scalar_curve(run_dir / "ppo", "objective/kl")]
    assert len(training_kl) == 50 and max(training_kl) <= 2 * target  # conf/experiment/demo.yaml: 50 rollouts
    for step in ("sft", "rm", "ppo"):
        assert json.loads((run_dir / step / "metrics.json").read_text())["status"] == "completed"
    rm = json.loads((run_dir / "rm" / "export" / "lightrlhf.json").read_text())
    assert rm["base"]["name_or_path"] == str(run_dir / "sft" / "export")  # the RM sits on the SFT model

    stamps = {s: (run_dir / s / "metrics.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    again = train_cli([f"resume={run_dir}"], timeout=DEMO_TIMEOUT_S, env=AS_MAKE_DEMO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 3
    assert stamps == {s: (run_dir / s / "metrics.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}


def test_a_length_biased_annotator_provokes_length_hacking_and_the_tripwire_fires(tmp_path):
    """The demo with an annotator that likes every extra word (a logit of +1 per word): the reward model learns
    length, PPO lengthens its answers without improving the hidden gold score, and the tripwire says so."""
    run_dir = tmp_path / "biased"
    # smaller data files and a shorter SFT: the phenomenon needs a policy that writes the language and
    # a reward model that has learned length, not the default demo's quality
    done = train_cli([f"hydra.run.dir={run_dir}", "demo.annotator.length_bias=1.0", *SMALL_DEMO,
                      'pipeline.extra.sft=["trainer.max_steps=100"]',
                      'pipeline.extra.rm=["trainer.max_steps=300","trainer.val_check_interval=300"]',
                      'pipeline.extra.ppo=["stage.rollouts=20","stage.eval.num_prompts=64","trainer.val_check_interval=20"]'],
                     timeout=DEMO_TIMEOUT_S, env=AS_MAKE_DEMO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alert length_drift at rollout" in done.stderr + done.stdout
    rm = json.loads((run_dir / "rm" / "metrics.json").read_text())["metrics"]
    assert rm["val/length_correlation"] > 0.5
    ppo = json.loads((run_dir / "ppo" / "metrics.json").read_text())["metrics"]
    assert ppo["alerts/length_drift_count"] >= 1
    assert ppo["eval/length_mean"] > 1.5 * ppo["eval/length_mean_initial"]
    assert ppo["eval/reward"] > ppo["eval/reward_initial"]
    assert ppo["eval/gold_score"] < ppo["eval/gold_score_initial"] + 0.5 * ppo["eval/gold_score_std_initial"]
