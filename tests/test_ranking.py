"""Seeded pipeline steps and the method ranking (launch/ranking.py): the steps each seed gets, the
seed that wins, and the table, points and plot written from the steps' metrics (hand values)."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import CONF, SMALL_DEMO, compose

from lightrlhf.errors import ConfigError
from lightrlhf.launch.pipeline import PipelineSpec, Step, compose_step, run_pipeline
from lightrlhf.launch.ranking import Point, method_point, rank
from lightrlhf.launch.run import to_plain

METHODS = ("best_of_16", "dpo", "ppo", "grpo", "rloo")


def _spec(steps, extra=None):
    return PipelineSpec.from_config({"steps": steps, "extra": extra or {}})


def test_a_step_with_seeds_runs_once_per_seed_after_the_steps_it_depends_on():
    spec = _spec([{"name": "sft", "overrides": ["stage=sft"]},
                  {"name": "dpo", "seeds": [0, 3], "overrides": ["stage=dpo", "policy.init={sft}/export"]}],
                 extra={"dpo": ["stage.beta=0.2"]})
    assert [(s.name, s.group, s.seed) for s in spec.steps] == [("sft", "sft", None), ("dpo_seed0", "dpo", 0),
                                                               ("dpo_seed3", "dpo", 3)]
    assert spec.steps[1].overrides == spec.steps[2].overrides == ["stage=dpo", "policy.init={sft}/export"]


@pytest.mark.parametrize("steps,extra,key", [
    ([{"name": "dpo", "seeds": [], "overrides": []}], {}, "pipeline.steps[0].seeds"),
    ([{"name": "dpo", "seeds": ["a"], "overrides": []}], {}, "pipeline.steps[0].seeds"),
    ([{"name": "dpo", "seeds": 3, "overrides": []}], {}, "pipeline.steps[0].seeds"),
    ([{"name": "dpo", "seeds": [0], "overrides": []}], {"dpo_seed0": []}, "pipeline.extra.dpo_seed0"),
    ([{"name": "dpo_seed0", "overrides": []}, {"name": "dpo", "seeds": [0], "overrides": []}], {}, "pipeline.steps"),
])
def test_bad_seeds_and_extras_are_config_errors_naming_the_key(steps, extra, key):
    with pytest.raises(ConfigError) as error:
        _spec(steps, extra)
    assert error.value.key == key


def test_the_seeded_steps_seed_wins_over_one_given_to_every_step_and_extras_reach_every_seed(tmp_path):
    from hydra import initialize_config_dir

    spec = _spec([{"name": "sft", "overrides": ["stage=sft"]},
                  {"name": "dpo", "seeds": [2], "overrides": ["stage=dpo", "policy.init={sft}/export"]}],
                 extra={"dpo": ["stage.beta=0.25"]})
    groups = {"stage": True, "model": True, "data": True}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sft_cfg, _, _ = compose_step(spec.steps[0], spec, tmp_path, ["seed=7"], groups, "train")
        dpo_cfg, overrides, _ = compose_step(spec.steps[1], spec, tmp_path, ["seed=7"], groups, "train")
    assert sft_cfg.seed == 7 and dpo_cfg.seed == 2 and "seed=7" not in overrides
    assert dpo_cfg.stage.beta == 0.25 and dpo_cfg.policy.init == f"{tmp_path / 'sft'}/export"


def test_method_points_read_each_kind_of_run():
    online = {"stage": "grpo", "wall_time_s": 40.0, "metrics": {
        "eval/gold_score": 1.2, "eval/win_rate_vs_sft": 0.8, "eval/kl": 3.5, "eval/gold_score_initial": 0.5,
        "eval/gold_score_std_initial": 0.6}}
    assert method_point("grpo_seed1", "grpo", 1, online) == Point("GRPO", 1, 1.2, 0.8, 3.5, 40.0, 0.5, 0.6)
    # a reward-weighted step is named by its method's step; its start counts towards the SFT row
    weighted = {**online, "stage": "reward_weighted"}
    assert method_point("rest_seed2", "rest", 2, weighted) == Point("ReST", 2, 1.2, 0.8, 3.5, 40.0, 0.5, 0.6)
    assert method_point("mine_seed0", "mine", 0, weighted).method == "mine"
    assert rank([method_point("rest_seed2", "rest", 2, weighted)], None)[1]["measurements"] == 1
    best = {"stage": "best_of_n", "wall_time_s": 30.0, "metrics": {
        f"best_of_n/{n}/{k}": v for n in (1, 2, 16) for k, v in
        (("gold_score", n / 10), ("win_rate_vs_n1", 0.5 + n / 100), ("kl", math.log(n) - (n - 1) / n))}}
    point = method_point("best_of_16_seed0", "best_of_16", 0, best)
    assert point == Point("best-of-16", 0, 1.6, 0.66, math.log(16) - 15 / 16, 30.0, 0.1, None)
    assert method_point("rm", "rm", None, {"stage": "rm", "metrics": {"val/accuracy": 0.9}}) is None


def test_rank_orders_by_mean_gold_with_the_sft_row_from_the_methods_starts():
    points = [Point("PPO", s, g, w, k, 10.0 + s, 0.5, 0.6) for s, g, w, k in
              ((0, 1.0, 0.7, 3.0), (1, 1.2, 0.8, 4.0), (2, 1.4, 0.9, 5.0))]
    points += [Point("DPO", s, g, 0.6, 1.0, 20.0, 0.5, 0.6) for s, g in ((0, 0.9), (1, 0.7))]
    rows, sft = rank(points, sft_wall_time_s=9.0)
    assert [r.method for r in rows] == ["PPO", "DPO", "SFT"]
    ppo, dpo, base = rows
    assert ppo.seeds == 3 and ppo.gold[0] == pytest.approx(1.2) and ppo.gold[1] == pytest.approx(0.2)
    assert ppo.kl == pytest.approx((4.0, 1.0)) and ppo.wall_time_s == pytest.approx(11.0)
    assert dpo.gold[0] == pytest.approx(0.8) and dpo.gold[1] == pytest.approx(math.sqrt(0.02))
    assert base.gold == (0.5, 0.0) and base.win_rate_vs_sft == (0.5, 0.0) and base.wall_time_s == 9.0
    assert sft == {"gold": 0.5, "gold_min": 0.5, "gold_max": 0.5, "measurements": 5, "gold_std_over_prompts": 0.6}


def test_the_method_ranking_pipeline_runs_each_method_per_seed_and_writes_the_ranking(tmp_path, monkeypatch):
    """experiment=method_ranking's pipeline, each step's composition and run stood in for (composing
    a step is tested above and in test_configs): the stand-in writes the metrics its stage would
    (gold = a per-method level + 0.1 x seed)."""
    from omegaconf import OmegaConf

    import lightrlhf.launch.pipeline as pipeline

    run_dir = tmp_path / "ranking"
    level = {"dpo": 0.8, "ppo": 1.2, "grpo": 1.1, "rloo": 1.0}
    ran = []

    def composed(step, spec, run_dir, global_overrides, groups, config_name):
        stage = next(o.split("=")[1] for o in step.overrides if o.startswith("stage="))
        seed = step.seed if step.seed is not None else next(int(o[5:]) for o in global_overrides if o.startswith("seed="))
        return OmegaConf.create({"seed": seed}), step.overrides, {"stage": stage}

    def stand_in(cfg, step_dir, overrides, choices, config_name):
        stage, seed = choices["stage"], cfg.seed
        ran.append((step_dir.name, stage, seed))
        if stage == "best_of_n":
            metrics = {f"best_of_n/{n}/{k}": v for n in (1, 16) for k, v in
                       (("gold_score", 0.5 if n == 1 else 1.3 + 0.1 * seed), ("win_rate_vs_n1", 0.5 + n / 40),
                        ("kl", math.log(n) - (n - 1) / n))}
        elif stage in level:
            metrics = {"eval/gold_score": level[stage] + 0.1 * seed, "eval/win_rate_vs_sft": 0.7,
                       "eval/kl": 2.0 + seed, "eval/gold_score_initial": 0.5, "eval/gold_score_std_initial": 0.6}
        else:
            metrics = {}
        step_dir.mkdir(parents=True)
        (step_dir / "metrics.json").write_text(json.dumps(
            {"status": "completed", "stage": stage, "wall_time_s": 10.0, "metrics": metrics}))

    cfg = compose(["experiment=method_ranking", "seed=5", "pipeline.parallel=1"], run_dir)
    monkeypatch.setattr(pipeline, "compose_step", composed)
    choices = {"stage": "pipeline", "model": "tiny", "data": "demo_sft", "experiment": "method_ranking"}
    run_pipeline(cfg, run_dir, ["experiment=method_ranking", "seed=5", "pipeline.parallel=1"], choices, "train",
                 stand_in)
    assert ran[:2] == [("sft", "sft", 5), ("rm", "rm", 5)]
    assert sorted(ran[2:]) == sorted((f"{m}_seed{s}", "best_of_n" if m == "best_of_16" else m, s)
                                     for m in METHODS for s in (0, 1, 2))
    table = (run_dir / "ranking.md").read_text().splitlines()
    assert [line.split(" | ")[1] for line in table[2:8]] == ["best-of-16", "PPO", "GRPO", "RLOO", "DPO", "SFT"]
    assert "| 1 | best-of-16 | 3 | 1.400 ± 0.100 | +1.50 |" in table[2]
    assert "| 2 | PPO | 3 | 1.300 ± 0.100 | +1.33 | 0.700 ± 0.000 | 3.00 ± 1.00 | 10 s |" == table[3]
    assert "12 runs measured it at their start" in table[-1] and "0.5000 to 0.5000" in table[-1]
    points = json.loads((run_dir / "ranking.json").read_text())["points"]
    assert len(points) == 15 and {p["method"] for p in points} == {"best-of-16", "DPO", "PPO", "GRPO", "RLOO"}
    assert (run_dir / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["steps"]) == {"sft", "rm"} | {f"{m}_seed{s}" for m in METHODS for s in (0, 1, 2)}
    assert "dpo" not in summary.get("gold_score", {})  # the gold chain leaves the ranked steps to the ranking


def test_the_experiment_composes_into_the_planned_steps(tmp_path):
    """Seeds 0-2 of each method after one SFT and one RM, two at a time; DPO samples the RL stages'
    held-out prompts with its step's seed (every step of it composes and checks: test_configs)."""
    from hydra import initialize_config_dir

    spec = PipelineSpec.from_config(to_plain(compose(["experiment=method_ranking"], tmp_path))["pipeline"])
    assert [s.name for s in spec.steps[:2]] == ["sft", "rm"] and spec.parallel == 2
    assert {(s.group, s.seed) for s in spec.steps[2:]} == {(m, s) for m in METHODS for s in (0, 1, 2)}
    assert all(isinstance(s, Step) for s in spec.steps)
    dpo = next(s for s in spec.steps if s.name == "dpo_seed1")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg, _, choices = compose_step(dpo, spec, tmp_path, ["seed=7"], {"stage": True, "data": True}, "train")
    assert choices["stage"] == "dpo" and cfg.seed == 1
    assert cfg.stage.eval_prompts.validation_path.kind == "prompts" and cfg.data.validation_path.kind == "preference"


def test_an_extra_replaces_the_steps_own_setting_of_the_same_key(tmp_path):
    """Only the override that holds is composed and recorded: a resume compares the same list."""
    from hydra import initialize_config_dir

    spec = _spec([{"name": "rm", "overrides": ["stage=rm", "data=demo_pref", "trainer.max_steps=1000"]}],
                 extra={"rm": ["trainer.max_steps=4"]})
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg, overrides, _ = compose_step(spec.steps[0], spec, tmp_path, [], {"stage": True, "data": True}, "train")
    assert cfg.trainer.max_steps == 4
    assert [o for o in overrides if o.startswith("trainer.max_steps")] == ["trainer.max_steps=4"]


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5])
def test_parallel_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError) as error:
        PipelineSpec.from_config({"steps": [{"name": "sft", "overrides": []}], "parallel": value})
    assert error.value.key == "pipeline.parallel"


def test_a_seeded_step_cannot_read_another_seeded_steps_directory():
    with pytest.raises(ConfigError) as error:
        _spec([{"name": "sft", "seeds": [0, 1], "overrides": ["stage=sft"]},
               {"name": "dpo", "seeds": [0], "overrides": ["stage=dpo", "policy.init={sft_seed0}/export"]}])
    assert error.value.key == "pipeline.steps.dpo" and "{sft_seed0}" in str(error.value)
    # an unseeded step may: it waits for the seeded ones before it
    spec = _spec([{"name": "sft", "seeds": [0], "overrides": ["stage=sft"]},
                  {"name": "dpo", "overrides": ["stage=dpo", "policy.init={sft_seed0}/export"]}])
    assert [s.name for s in spec.steps] == ["sft_seed0", "dpo"]


def _parallel(seeds: str) -> list[str]:
    """Seeded SFT steps side by side (pipeline.parallel=2) after an unseeded one; 1 checkpoint every 5 steps.
    The small demo files: the subject is the machinery (stopping, resuming, failing), not what is learned.
    80 steps: the seed that starts first must still be training when the other has saved its first
    checkpoint (the test's SIGTERM then comes); measured on 2 busy cores, it was about 22 steps in."""
    return ["~experiment", "stage=pipeline", "pipeline.parallel=2", *SMALL_DEMO,
            '+pipeline.steps=[{name: base, overrides: ["stage=sft", "trainer.max_steps=4", "stage.eval.num_prompts=8"]},'
            f' {{name: sft, seeds: {seeds}, overrides: ["stage=sft", "model.name_or_path={{base}}/export",'
            ' "trainer.max_steps=80", "trainer.val_check_interval=80", "stage.eval.num_prompts=8",'
            ' "callbacks.checkpoint.every_n_steps=5"]}]']


PARALLEL = _parallel("[0, 1]")


@pytest.mark.slow
def test_parallel_steps_stop_on_sigterm_with_checkpoints_and_the_pipeline_resumes(tmp_path):
    """SIGTERM to the pipeline while its seeded steps run as processes: each step saves a checkpoint
    and stops, the pipeline exits 143 pointing at resume=<its dir>; resumed, it finishes both seeds."""
    import signal
    import time

    from conftest import start_train, train_cli

    run_dir = tmp_path / "pipe"
    process = start_train([*PARALLEL, f"hydra.run.dir={run_dir}"])  # the real train.py, a process of its own
    deadline = time.monotonic() + 400
    seeds = [run_dir / f"sft_seed{s}" for s in (0, 1)]
    while not all(list((d / "checkpoints").glob("*.ckpt")) if d.exists() else False for d in seeds):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert f"resume={run_dir}" in stderr.strip().splitlines()[-1]
    for directory in seeds:  # each stopped with a checkpoint of its own, not finished
        assert not (directory / "metrics.json").exists()
        assert "received SIGTERM" in (directory / "train.log").read_text()
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pipeline step base already finished" in resumed.stdout
    for seed, directory in enumerate(seeds):
        record = json.loads((directory / "metrics.json").read_text())
        assert record["status"] == "completed" and record["global_step"] == 80
        assert json.loads((directory / "run.json").read_text())["launches"] == 2
        assert f"seed={seed}" in " ".join(json.loads((directory / "run.json").read_text())["overrides"])
    assert "pipeline step sft_seed0 (resuming): started as process" in resumed.stdout


@pytest.mark.slow
def test_a_failing_parallel_step_is_one_line_with_its_exit_status(tmp_path):
    from conftest import train_cli

    run_dir = tmp_path / "pipe"
    # one seeded step: a step process that fails is the subject, and each costs a Python start-up
    failed = train_cli(_parallel("[0]") + ['+pipeline.extra.sft=["stage.optim.lr=-1"]', f"hydra.run.dir={run_dir}"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: pipeline step (sft_seed[01]) failed \(exit 2\): error: config stage\.optim\.lr: (.*) "
                         r"\(its output: (.*)\)", last)
    assert match, last
    assert match[3] == str(run_dir / match[1] / "console.log")
    assert json.loads((run_dir / "base" / "metrics.json").read_text())["status"] == "completed"


def test_parallel_steps_outside_train_py_are_one_line_asking_for_parallel_1():
    """Side-by-side steps are `python train.py` processes: a pipeline run in-process (no Hydra main)
    cannot start them, and says so in one line naming the setting."""
    from lightrlhf.errors import UserError
    from lightrlhf.launch.parallel import entry_script

    with pytest.raises(UserError) as error:
        entry_script()
    message = str(error.value)
    assert "\n" not in message and message.endswith("set pipeline.parallel=1")
    assert message.startswith("pipeline.parallel > 1 runs each step as `python train.py ...`")


def test_every_step_of_the_chinese_ranking_runs_on_the_chinese_demo(tmp_path):
    """experiment=method_ranking_zh: a step is composed from its own overrides and the command line's,
    never from the experiment file's defaults, so each step must name demo=zh itself."""
    from hydra import initialize_config_dir

    spec = PipelineSpec.from_config(to_plain(compose(["experiment=method_ranking_zh"]).pipeline))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        groups = {"stage": True, "model": True, "data": True, "demo": True}
        names = set()
        for step in spec.steps:
            if step.seed not in (None, 0):
                continue
            step_cfg, _, _ = compose_step(step, spec, tmp_path, [], groups, "train")
            assert step_cfg.demo.language == "zh", step.name
            assert step_cfg.model.name_or_path.endswith("tiny_zh") or step_cfg.model.name_or_path.endswith("/export")
            names.add(step.group)
    assert names == {"sft", "rm", "ppo", "raft", "rest", "rwr", "reinforce", "naive"}
