"""Reliability, second pass: damaged checkpoints, a disk that fills up for real, curves that survive a
kill at any moment, a run directory claimed only once the run is built, `resume=` that names no run,
a budget of nothing.

The kill/resume checks compare every scalar TensorBoard tag, (step, value) for (step, value), with an
uninterrupted run of the same command -- except `time/*` (PPO's rollout and update seconds: wall
clock, different in any two runs). Their checkpoint and validation intervals differ on purpose: an
evaluation due at the very step of a checkpoint is not rerun after a kill between the two (README,
"When things go wrong").
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from conftest import SMALL_DEMO, every_curve, shared, train_cli, train_with_fault
from safetensors.torch import load_file

# small batches and demo files: what is under test is where a run stops and resumes, not what it learns
SFT = ["stage=sft", "trainer.max_steps=30", "trainer.val_check_interval=15", "callbacks.checkpoint.every_n_steps=10",
       "trainer.log_every_n_steps=5", "stage.eval.num_prompts=16", "model.lora.r=4", "stage.datamodule.batch_size=8",
       *SMALL_DEMO]
RM = ["stage=rm", "data=demo_pref", "trainer.max_steps=20", "trainer.val_check_interval=15",
      "callbacks.checkpoint.every_n_steps=10", "trainer.log_every_n_steps=5", "stage.datamodule.batch_size=8", *SMALL_DEMO]


def _ppo(exports) -> list[str]:
    return ["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", "stage.datamodule.batch_size=8", "stage.eval.num_prompts=16",
            "stage.eval.batch_size=16", "reward.normalize.init_rollouts=1", "stage.rollouts=4",
            "trainer.val_check_interval=3", "callbacks.checkpoint.every_n_steps=16", *SMALL_DEMO]


def _assert_same_curves(run_dir, reference):
    got, want = every_curve(run_dir), every_curve(reference)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert got[tag] == want[tag], tag


def _assert_same_export(run_dir, reference):
    a = load_file(run_dir / "export" / "adapter_model.safetensors")
    b = load_file(reference / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))


def _temp_files(directory) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, request):
    """The uninterrupted run of each stage's command, made when a test first needs it (once for both workers)."""
    def run(stage: str):
        def make(run_dir):
            done = train_cli(_args(stage, request) + [f"hydra.run.dir={run_dir}"])
            assert done.returncode == 0, done.stderr[-3000:]

        return shared(tmp_path_factory, f"reliability-straight-{stage}", make)

    return run


def _args(stage: str, request) -> list[str]:
    return {"sft": SFT, "rm": RM}[stage] if stage != "ppo" else _ppo(request.getfixturevalue("exports"))


# -- points 4 and 5: killed before the first checkpoint, right after one, or while writing one ----------
# (stage, the fault: SIGKILL at the start of a batch before the first checkpoint; right after a
# checkpoint is on disk; halfway through writing one, which leaves a temporary file and the one before).
# What a stage adds to a checkpoint (data order, PPO's rollout state and normaliser) is restored only
# after a kill right after one: every stage gets that case. Starting again from step 0 and setting a
# torn write aside are the launcher's and the checkpoint writer's, the same code for every stage: SFT
# (the cheapest) and PPO (its first checkpoint torn: nothing to resume from) cover them.
KILLS = [("sft", "kill_at_batch:8"), ("sft", "kill_after_checkpoint:1"), ("sft", "kill_during_checkpoint:2"),
         ("rm", "kill_after_checkpoint:1"), ("ppo", "kill_after_checkpoint:1"), ("ppo", "kill_during_checkpoint:1")]


@pytest.mark.slow
@pytest.mark.parametrize("stage,fault", KILLS, ids=[f"{s}-{f.split(':')[0]}" for s, f in KILLS])
def test_killed_and_resumed_every_curve_equals_the_uninterrupted_run(straight, tmp_path, request, stage, fault):
    """Before the first checkpoint the resumed run starts again from step 0 and the killed run's points
    are hidden; right after one, the checkpointed step keeps every tag's point (`lr-*`, `epoch`); a
    torn write is ignored and the run continues from the checkpoint before it."""
    reference = straight(stage)
    run_dir = tmp_path / "killed"
    killed = train_with_fault(fault, _args(stage, request) + [f"hydra.run.dir={run_dir}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert every_curve(run_dir), "the killed run should have written points"
    torn = fault.startswith("kill_during_checkpoint")
    assert bool(_checkpoints(run_dir)) == (not fault.startswith("kill_at_batch") and fault != "kill_during_checkpoint:1")
    assert bool(_temp_files(run_dir)) == torn
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_curves(run_dir, reference)
    _assert_same_export(run_dir, reference)
    metrics = [{k: v for k, v in json.loads((d / "metrics.json").read_text())["metrics"].items()
                if not k.startswith("time/")} for d in (run_dir, reference)]
    assert metrics[0] == metrics[1]


# -- point 1: a damaged newest checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_sft(tmp_path_factory):
    """An SFT run killed right after its second checkpoint (steps 10 and 20 on disk); tests copy from it."""
    def make(run_dir):
        killed = train_with_fault("kill_after_checkpoint:2", SFT + [f"hydra.run.dir={run_dir}"])
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    run_dir = shared(tmp_path_factory, "reliability-killed-sft", make)
    assert _checkpoints(run_dir) == ["step-00000010.ckpt", "step-00000020.ckpt"]
    return run_dir


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if how == "emptied" else data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_resume_sets_a_damaged_newest_checkpoint_aside_and_uses_the_one_before(killed_sft, straight, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_sft, run_dir, symlinks=True)
    newest = run_dir / "checkpoints" / "step-00000020.ckpt"
    _damage(newest, how)
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    warnings = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "step-00000020.ckpt" in line]
    assert len(warnings) == 1 and "not a readable checkpoint" in warnings[0], warnings
    assert warnings[0].endswith("set aside as step-00000020.ckpt.damaged, using the checkpoint before it")
    assert (run_dir / "checkpoints" / "step-00000020.ckpt.damaged").is_file()
    # it continued from step 10: the same result and the same curves as the uninterrupted run
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 30
    _assert_same_export(run_dir, straight("sft"))
    _assert_same_curves(run_dir, straight("sft"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_ckpt_path_to_a_damaged_file_is_one_line(killed_sft, tmp_path, how):
    damaged = tmp_path / "step-00000020.ckpt"
    shutil.copyfile(killed_sft / "checkpoints" / "step-00000020.ckpt", damaged)
    _damage(damaged, how)
    run_dir = tmp_path / "run"
    done = train_cli(SFT + [f"ckpt_path={damaged}", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: config ckpt_path: {damaged}: not a readable checkpoint (")
    assert damaged.is_file()  # another run's file: reported, not moved
    assert not (run_dir / "run.json").exists()


def test_start_point_skips_damaged_checkpoints_and_reads_the_bookkeeping(tmp_path, caplog):
    from lightrlhf.launch.record import start_point

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (10, 20, 30):
        state = {"global_step": step, "callbacks": {"PeriodicCheckpoint": {"elapsed_s": float(step),
                                                                           "carried_logs": {"step": step - 1}}}}
        torch.save(state, checkpoints / f"step-{step:08d}.ckpt")
    _damage(checkpoints / "step-00000030.ckpt", "truncated")
    _damage(checkpoints / "step-00000020.ckpt", "emptied")
    with caplog.at_level("WARNING"):
        start = start_point(tmp_path, resume=True, ckpt_path=None)
    assert (start.checkpoint, start.purge_step, start.elapsed_s) == (checkpoints / "step-00000010.ckpt", 9, 10.0)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000010.ckpt", "step-00000020.ckpt.damaged",
                                                             "step-00000030.ckpt.damaged"]
    assert len(caplog.messages) == 2 and all("\n" not in m for m in caplog.messages)
    assert "step-00000020.ckpt: not a readable checkpoint (empty file)" in caplog.messages[1]
    # nothing left that loads: from the beginning, every earlier event hidden
    _damage(checkpoints / "step-00000010.ckpt", "truncated")
    assert start_point(tmp_path, resume=True, ckpt_path=None) == type(start)(None, 0, 0.0)


# -- point 2: the disk fills up, for real (a file-size limit: write() fails inside torch.save) ----------
@pytest.mark.slow
def test_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    # full fine-tuning: checkpoints of ~5 MB with tensors larger than a file buffer, so that the write
    # fails inside torch.save (which says so with a RuntimeError of its own); once the first one is on
    # disk no file may grow past 1 MB (the logs and events stay far below)
    full = [a for a in SFT if not a.startswith("model.lora")] + ["model.lora=null"]
    done = train_with_fault("file_size_limit_after_checkpoint:1:1000000", full + [f"hydra.run.dir={run_dir}"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    target = run_dir / "checkpoints" / "step-00000020.ckpt"
    assert done.stderr.splitlines()[-1] == f"error: {target}: cannot write (File too large); nothing was replaced"
    assert _checkpoints(run_dir) == ["step-00000010.ckpt"] and not _temp_files(run_dir)
    torch.load(run_dir / "checkpoints" / "step-00000010.ckpt", weights_only=True)  # intact
    resumed = train_cli([f"resume={run_dir}"])  # space again: the run continues from it
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.slow
def test_full_disk_while_exporting_is_one_line_and_leaves_no_half_export(tmp_path):
    run_dir = tmp_path / "run"
    # the adapter (~73 kB, written by safetensors) does not fit; the logs and events (< 10 kB) still do
    done = train_with_fault("file_size_limit_at_export:32768", SFT + [f"hydra.run.dir={run_dir}"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: {run_dir / 'export'}: cannot write (File too large); "
                                            "nothing was replaced")
    assert not (run_dir / "export").exists() and not _temp_files(run_dir)
    assert not (run_dir / "metrics.json").exists()


# -- point 6: a run that fails before it is built leaves the directory reusable -------------------------
@pytest.mark.slow
def test_a_run_that_fails_before_training_leaves_the_directory_reusable(tmp_path, exports):
    run_dir = tmp_path / "run"
    # found only once the run starts: the reward function's contract, checked on its first scores
    echo = ("+reward.components.echo={_target_: lightrlhf.rewards.spec.Component, "
            "fn: {_target_: operator.concat, _partial_: true}}")
    args = _ppo(exports) + ["stage.rollouts=1", "trainer.val_check_interval=1"]
    failed = train_cli(args + [echo, f"hydra.run.dir={run_dir}"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.splitlines()[-1].startswith("error: reward.components.echo (_operator.concat): returned 16")
    assert not {"run.json", "config.yaml", "tb", "checkpoints"} & {p.name for p in run_dir.iterdir()}
    corrected = train_cli(args + [f"hydra.run.dir={run_dir}"])
    assert corrected.returncode == 0, corrected.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_pipeline_whose_first_step_fails_to_build_leaves_the_directory_reusable(tmp_path):
    run_dir = tmp_path / "demo"
    failed = train_cli(['pipeline.extra.sft=["model.lora.r=0"]', f"hydra.run.dir={run_dir}"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.splitlines() == ["error: config model.lora.r: must be > 0, got 0"]
    assert not (run_dir / "run.json").exists() and not (run_dir / "sft" / "run.json").exists()
    assert not (run_dir / "config.yaml").exists()


# -- point 7: resume= that names no run ---------------------------------------------------------------
@pytest.mark.slow
def test_resume_of_a_missing_directory_is_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    done = train_cli([f"resume={missing}"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: resume={missing}: no such directory"]
    assert not missing.exists()


@pytest.mark.slow
def test_resume_of_a_directory_without_a_run_is_one_line_and_writes_nothing(tmp_path):
    export = tmp_path / "export"  # e.g. an export directory given by mistake
    export.mkdir()
    (export / "adapter_config.json").write_text("{}")
    done = train_cli([f"resume={export}"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: resume={export}: no run to resume there (no run.json; "
                                        "is it the directory of a lightrlhf run?)"]
    assert sorted(p.name for p in export.iterdir()) == ["adapter_config.json"]


# -- point 10: a budget of nothing; a pipeline's wall time over its launches ---------------------------
@pytest.mark.slow
def test_max_steps_zero_is_a_config_error(tmp_path):
    run_dir = tmp_path / "run"
    done = train_cli(["stage=sft", "trainer.max_steps=0", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["error: config trainer.max_steps: must be > 0 (or -1: no step budget), "
                                        "got 0; nothing would be trained"]
    assert not (run_dir / "export").exists() and not (run_dir / "metrics.json").exists()


TWO_STEPS = ['pipeline.steps=[{name: sft, overrides: ["stage=sft", "trainer.max_steps=10", "trainer.val_check_interval=10",'
             ' "stage.eval.num_prompts=16"]}, {name: rm, overrides: ["stage=rm", "data=demo_pref",'
             ' "model.name_or_path={sft}/export", "trainer.max_steps=20", "trainer.val_check_interval=20",'
             ' "stage.datamodule.batch_size=8"]}]',
             "~pipeline.extra", "callbacks.checkpoint.every_n_steps=10", *SMALL_DEMO]


@pytest.mark.slow
def test_a_resumed_pipeline_counts_the_wall_time_of_every_launch(tmp_path):
    run_dir = tmp_path / "demo"
    # the SFT step checkpoints at 10; the second checkpoint is the reward model's first
    killed = train_with_fault("kill_after_checkpoint:2", TWO_STEPS + [f"hydra.run.dir={run_dir}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = {name: json.loads((run_dir / name / "metrics.json").read_text()) for name in ("sft", "rm")}
    assert summary["wall_time_s"] == round(sum(s["wall_time_s"] for s in steps.values()), 1)
    # the reward model's time includes its first launch's, up to the checkpoint it resumed from
    checkpoint = torch.load(run_dir / "rm" / "checkpoints" / "step-00000010.ckpt", weights_only=True)
    assert 0 < checkpoint["callbacks"]["PeriodicCheckpoint"]["elapsed_s"] < steps["rm"]["wall_time_s"]
