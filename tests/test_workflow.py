"""The research workflow: the pipeline in one command, sweeps and their summaries, crash-proof resume."""

from __future__ import annotations

import json
import math
import shutil
import signal
import time

import pytest
from conftest import CONF, SMALL_DEMO, every_curve, scalar_curve, shared, start_train, train_cli, train_with_fault
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

pytestmark = pytest.mark.slow
QUICK_PIPELINE = [*SMALL_DEMO,
                  'pipeline.extra.sft=["trainer.max_steps=20","stage.eval.num_prompts=32","stage.datamodule.batch_size=8"]',
                  'pipeline.extra.rm=["trainer.max_steps=20","trainer.val_check_interval=20","stage.datamodule.batch_size=8"]',
                  'pipeline.extra.ppo=["stage.rollouts=3","stage.eval.num_prompts=32","stage.datamodule.batch_size=16",'
                  '"reward.normalize.init_rollouts=1","trainer.val_check_interval=3","callbacks.checkpoint.every_n_steps=8"]']


def test_pipeline_killed_in_the_middle_resumes_the_interrupted_step_only(tmp_path):
    run_dir = tmp_path / "demo"
    # the SFT step checkpoints at 10 and 20 steps; the RM step at 10: the third checkpoint is inside the RM step
    killed = train_with_fault("kill_after_checkpoint:3", [f"hydra.run.dir={run_dir}",
                                                          "callbacks.checkpoint.every_n_steps=10"] + QUICK_PIPELINE)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "sft" / "metrics.json").read_text())["status"] == "completed"
    assert not (run_dir / "rm" / "metrics.json").exists()
    sft_stamp = (run_dir / "sft" / "metrics.json").stat().st_mtime_ns
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "sft" / "metrics.json").stat().st_mtime_ns == sft_stamp
    assert "pipeline step rm (resuming)" in resumed.stdout
    assert json.loads((run_dir / "ppo" / "metrics.json").read_text())["status"] == "completed"


def _composed(overrides):
    """What Hydra hands `run`: the config without its own node, the overrides, the group choices."""
    from hydra import compose
    from omegaconf import open_dict

    cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, overrides, choices


def test_a_pipeline_and_its_resume_compose_each_step_once(tmp_path, monkeypatch, caplog):
    """In this process, as `python train.py` runs it: one composition per step that runs."""
    import hydra
    from hydra import initialize_config_dir

    from lightrlhf.launch.record import with_recorded_overrides
    from lightrlhf.launch.run import run_stage

    run_dir = tmp_path / "demo"
    tiny = ['pipeline.extra.sft=["trainer.max_steps=4","trainer.val_check_interval=4","stage.eval.num_prompts=8"]',
            'pipeline.extra.rm=["trainer.max_steps=4","trainer.val_check_interval=4"]',
            'pipeline.extra.ppo=["stage.rollouts=1","stage.eval.num_prompts=8","stage.datamodule.batch_size=8",'
            '"reward.normalize.init_rollouts=1","trainer.val_check_interval=1"]',
            "callbacks.checkpoint.every_n_steps=2", f"paths.output_dir={run_dir}"]
    compositions = []

    def counting(*args, **kwargs):
        compositions.append(kwargs.get("overrides"))
        return real_compose(*args, **kwargs)

    real_compose = hydra.compose
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), caplog.at_level("INFO", "lightrlhf"):
        cfg, overrides, choices = _composed(tiny)
        monkeypatch.setattr(hydra, "compose", counting)
        run_stage(cfg, run_dir, overrides, choices)
        assert len(compositions) == 3
        # killed in the reward-model step: its record and checkpoints are there, not its metrics
        (run_dir / "rm" / "metrics.json").unlink()
        shutil.rmtree(run_dir / "ppo")
        monkeypatch.setattr(hydra, "compose", real_compose)
        cfg, overrides, choices = _composed(with_recorded_overrides(["train.py", f"resume={run_dir}"])[1:])
        del compositions[:]
        monkeypatch.setattr(hydra, "compose", counting)
        run_stage(cfg, run_dir, overrides, choices)
    assert len(compositions) == 2, compositions
    assert f"pipeline step sft already finished: {run_dir / 'sft'}" in caplog.messages
    assert any(m.startswith("pipeline step rm (resuming): ") for m in caplog.messages)
    assert all(json.loads((run_dir / s / "metrics.json").read_text())["status"] == "completed" for s in ("rm", "ppo"))
    assert json.loads((run_dir / "rm" / "run.json").read_text())["launches"] == 2


# checkpoints every 7 steps, evaluations every 30: never at the same step (README, "When things go wrong");
# 1,000 demonstrations are 32 batches, so the 120 steps cross three epoch boundaries and a kill may land in any epoch
ANY_MOMENT = ["stage=sft", "trainer.max_steps=120", "callbacks.checkpoint.every_n_steps=7",
              "trainer.val_check_interval=30", "trainer.log_every_n_steps=1", "stage.eval.num_prompts=32", *SMALL_DEMO]


@pytest.fixture(scope="module")
def uninterrupted_sft(tmp_path_factory):
    def make(run_dir):
        done = train_cli(ANY_MOMENT + [f"hydra.run.dir={run_dir}"])
        assert done.returncode == 0, done.stderr[-3000:]

    return shared(tmp_path_factory, "workflow-uninterrupted-sft", make)


@pytest.mark.parametrize("after_seconds", [1.5, 4.5])
def test_sigkill_at_any_moment_then_resume_continues_the_curves_once(tmp_path, uninterrupted_sft, after_seconds):
    """Killed at a wall-clock moment after training started (not at a hook): in a write, a step, a
    validation. Resumed, every curve equals the uninterrupted run's, tag for tag, step for step."""
    run_dir = tmp_path / "run"
    args = ANY_MOMENT + [f"hydra.run.dir={run_dir}"]
    process = start_train(args)
    deadline = time.monotonic() + 120
    while not (run_dir / "run.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after_seconds)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 120
    steps = [step for step, _ in scalar_curve(run_dir, "train/loss")]
    assert steps == list(range(120)), steps  # continued: every step once, none twice, none missing
    got, want = every_curve(run_dir), every_curve(uninterrupted_sft)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert got[tag] == want[tag], tag


def test_grid_sweep_reports_a_failed_run_without_stopping_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    done = train_cli(["-m", "stage=rm", "data=demo_pref", "stage.optim.lr=1e-3,-1", "model.lora.r=4,8",
                      "trainer.max_steps=4", "trainer.val_check_interval=4", "stage.datamodule.batch_size=8",
                      *SMALL_DEMO, f"hydra.sweep.dir={sweep}"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(summary["runs"]) == 4
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["error"] == "config stage.optim.lr: must be > 0, got -1.0" for r in failed)
    assert summary["best"]["status"] == "completed" and "stage.optim.lr=0.001" in summary["best"]["overrides"]
    assert summary["best"]["metric"] == "val/accuracy"
    table = (sweep / "sweep_summary.md").read_text()
    assert "**best**" in table and "model.lora.r=8" in table
    # TensorBoard's HParams view: each run wrote its overrides as hyperparameters
    run = next(r for r in summary["runs"] if r["status"] == "completed")["dir"]
    plugins = {value.metadata.plugin_data.plugin_name for path in (sweep / run.split("/")[-1] / "tb").glob("events.*")
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    assert "hparams" in plugins


def test_two_trial_optuna_sweep_writes_its_summary(tmp_path):
    sweep = tmp_path / "optuna"
    done = train_cli(["-m", "hparams_search=rm_optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=4",
                      "trainer.val_check_interval=4", "stage.datamodule.batch_size=8", *SMALL_DEMO,
                      f"hydra.sweep.dir={sweep}"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(summary["runs"]) == 2 and summary["best"] is not None
    assert all(any(o.startswith("stage.optim.lr=") for o in r["overrides"]) for r in summary["runs"])
    assert (sweep / "optimization_results.yaml").is_file()  # Optuna's own record of the best parameters


def test_ppo_optuna_search_runs_a_trial_over_its_space(tmp_path, exports):
    sweep = tmp_path / "optuna"
    done = train_cli(["-m", "hparams_search=ppo_optuna", "hydra.sweeper.n_trials=1",
                      f"policy.init={exports / 'sft' / 'export'}", f"reward.path={exports / 'rm' / 'export'}",
                      "stage.rollouts=2", "stage.datamodule.batch_size=8", "stage.eval.num_prompts=16",
                      "stage.eval.batch_size=16", "reward.normalize.init_rollouts=1", "trainer.val_check_interval=2",
                      f"hydra.sweep.dir={sweep}"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    [trial] = summary["runs"]
    assert trial["status"] == "completed" and trial["metric"] == "eval/reward" and math.isfinite(trial["value"])
    searched = {o.split("=", 1)[0] for o in trial["overrides"]}
    assert searched >= {"stage.optim.lr", "stage.kl.coef", "stage.ppo.clip_range", "stage.ppo.epochs"}
