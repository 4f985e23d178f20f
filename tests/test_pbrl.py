"""stage=pbrl end to end: a short CartPole training from the oracle's answers lifts the true return; a
run killed after a checkpoint resumes to the very curves of an uninterrupted one; a bad setting is one
line; the stage builds from Python in three lines."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import compose, every_curve, shared, train_cli, train_with_fault

from lightrlhf.launch.run import to_plain

# 16 iterations of 8 x 128 steps; 100 queries in 4 rounds (iterations 0, 4, 8, 12); evaluations at the
# start and after iterations 8 and 16
SHORT = ["stage=pbrl", "env=cartpole", "stage.env_steps=16384", "stage.queries.total=100", "stage.queries.rounds=4",
         "trainer.val_check_interval=8", "callbacks.checkpoint.every_n_steps=400"]
# 6 iterations, 3 rounds; checkpoints every 2 iterations (80 optimizer steps), evaluations every 3
RESUMABLE = ["stage=pbrl", "env=cartpole", "stage.env_steps=6144", "stage.queries.total=60", "stage.queries.rounds=3",
             "stage.queries.every=2", "trainer.val_check_interval=3", "callbacks.checkpoint.every_n_steps=80"]


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_a_short_cartpole_training_from_the_oracle_lifts_the_true_return(tmp_path):
    run_dir = tmp_path / "run"
    done = train_cli(SHORT + [f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    record = _metrics(run_dir)
    metrics = record["metrics"]
    # the random initial policy keeps the pole up ~9 steps; the trained one several times as long
    assert metrics["eval/true_return_initial"] < 15
    assert metrics["eval/true_return"] > 4 * metrics["eval/true_return_initial"], metrics
    assert metrics["progress/queries"] == 100 and metrics["progress/env_steps"] == 16384
    # the reward model agrees with the hidden truth on held-out clips
    assert metrics["eval/preference_accuracy"] > 0.7 and metrics["eval/return_correlation"] > 0.5, metrics
    curves = every_curve(run_dir)
    for tag in ("eval/true_return", "eval/learned_return", "eval/preference_accuracy", "eval/return_correlation",
                "progress/queries", "progress/env_steps", "queries/tie_fraction", "policy/entropy"):
        assert tag in curves, tag
    assert [v for _, v in curves["progress/queries"]][-1] == 100
    export = run_dir / "export"
    assert {p.name for p in export.iterdir()} == {"policy.safetensors", "reward_model.safetensors", "lightrlhf.json"}
    assert json.loads((export / "lightrlhf.json").read_text())["teacher"] == "oracle"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    def make(run_dir):
        done = train_cli(RESUMABLE + [f"hydra.run.dir={run_dir}"])
        assert done.returncode == 0, done.stderr[-3000:]

    return shared(tmp_path_factory, "pbrl-uninterrupted", make)


@pytest.mark.slow
def test_killed_after_a_checkpoint_and_resumed_gives_the_uninterrupted_curves(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    killed = train_with_fault("kill_after_checkpoint:2", RESUMABLE + [f"hydra.run.dir={run_dir}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["step-00000080.ckpt",
                                                                               "step-00000160.ckpt"]
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = every_curve(run_dir), every_curve(uninterrupted)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert got[tag] == want[tag], tag
    strip = lambda m: {k: v for k, v in m["metrics"].items() if not k.startswith("time/")}  # noqa: E731
    assert strip(_metrics(run_dir)) == strip(_metrics(uninterrupted))
    from safetensors.torch import load_file

    for name in ("policy.safetensors", "reward_model.safetensors"):
        a, b = load_file(run_dir / "export" / name), load_file(uninterrupted / "export" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


BAD_SETTINGS = [
    ("stage.teacher=sage", "config stage.teacher: must be human or one of the configured teachers "
                           "['equal', 'mistake', 'myopic', 'noisy', 'oracle', 'skip'], got 'sage'"),
    ("stage.queries.selection=best", "config stage.queries.selection: expected one of 'random', "
                                     "'disagreement', 'ucb', got str 'best'"),
    ("stage.teachers.noisy.beta=-1", "config stage.teachers.noisy.beta: must be > 0, got -1.0"),
    ("reward=maybe", "config stage.reward: must be learned or true, got 'maybe'"),
    ("stage.queries.clip_length=500", "config stage.queries.clip_length: must fit twice in one rollout "
                                      "(ppo.rollout_steps=128), got 500"),
    # 65 + 65 > 128: a rollout whose episode end falls at step 64 would hold no whole 65-step window
    ("stage.queries.clip_length=65", "config stage.queries.clip_length: must fit twice in one rollout "
                                     "(ppo.rollout_steps=128), got 65"),
]


@pytest.mark.parametrize("override,message", BAD_SETTINGS)
def test_a_bad_setting_names_its_key(tmp_path, override, message):
    from lightrlhf.errors import ConfigError
    from lightrlhf.launch.parts import build_stage

    with pytest.raises(ConfigError) as error:
        build_stage(to_plain(compose(["stage=pbrl", "env=cartpole", override], tmp_path)))
    assert str(error.value) == message


@pytest.mark.slow
def test_a_bad_setting_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    """The command line turns the error above into one line and exit status 2, before any directory is claimed."""
    override, message = BAD_SETTINGS[0]
    run_dir = tmp_path / "run"
    done = train_cli(["stage=pbrl", override, f"hydra.run.dir={run_dir}"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [f"error: {message}"]
    assert not (run_dir / "run.json").exists()


def test_a_control_stage_without_an_environment_is_a_config_error(tmp_path):
    from lightrlhf.errors import ConfigError
    from lightrlhf.launch.parts import build_stage

    plain = to_plain(compose(["stage=pbrl"], tmp_path))
    plain["env"] = None
    with pytest.raises(ConfigError, match="^config env: this stage runs in an environment: choose one with "
                                          "env=cartpole or env=pendulum$"):
        build_stage(plain)


def test_the_stage_builds_from_python_in_three_lines(tmp_path):
    from lightrlhf.control.envs import EnvSpec
    from lightrlhf.control.teachers import TeacherSpec
    from lightrlhf.stages.pbrl import PbRLStage

    env = EnvSpec(task="cartpole", horizon=200, num_envs=2, eval_episodes=2, eval_seed=0, fall_steps=20)
    stage = PbRLStage(env, teachers={"oracle": TeacherSpec()})
    assert stage.iterations == 200_000 // (2 * 128) and stage.model.discrete


def test_the_shipped_config_builds_both_tasks(tmp_path):
    from lightrlhf.launch.parts import build_stage

    for task in ("cartpole", "pendulum"):
        stage, datamodule = build_stage(to_plain(compose(["stage=pbrl", f"env={task}"], tmp_path)))
        assert datamodule is None and stage.env_spec.task == task
        assert stage.model.discrete == (task == "cartpole")
