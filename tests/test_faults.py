"""Faults provoked for real: NaN, SIGTERM/SIGINT, unwritable directories, a full disk, wrong inputs.

Each test checks the one-line message, the exit status, and that earlier checkpoints and exports
are intact (nothing half-written is left behind).
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
import torch
from conftest import SMALL_DEMO, run_in_process, start_train, train_cli, train_with_fault

from lightrlhf.errors import UserError

pytestmark = pytest.mark.slow
# small batches and demo files: the faults are under test, not what is learned
SMALL = ["stage.datamodule.batch_size=8", *SMALL_DEMO]
SFT = ["stage=sft", "trainer.max_steps=40", "callbacks.checkpoint.every_n_steps=10", "trainer.val_check_interval=40",
       "stage.eval.num_prompts=16", *SMALL]


def _checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))


def _no_temp_files(directory):
    return not [p for p in directory.rglob("*") if p.name.startswith(".tmp-")]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    done = train_with_fault("nan_loss_at_step:25", SFT + [f"hydra.run.dir={run_dir}"])
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        "error: sft stage, step 24: loss is nan; stopped before the optimizer step, the last checkpoint is the last "
        "good state (numerics.on_nonfinite=skip skips such batches instead)")
    assert "Traceback" not in done.stderr
    assert _checkpoints(run_dir) == ["step-00000010.ckpt", "step-00000020.ckpt"]
    state = torch.load(run_dir / "checkpoints" / "step-00000020.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (run_dir / "export").exists() and not (run_dir / "metrics.json").exists()


def test_nan_loss_skipped_and_counted_when_asked(tmp_path):
    run_dir = tmp_path / "run"
    done = train_with_fault("nan_loss_at_step:25", SFT + ["numerics.on_nonfinite=skip", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sft stage, step 24: loss is nan; batch skipped (1 skipped so far)" in done.stdout + done.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["numerics/skipped_batches"] == 1.0
    # the skipped batch made no optimizer step: 40 batches were needed for 40 steps plus the skipped one
    assert record["global_step"] == 40


@pytest.mark.parametrize("fault,quantity", [("nan_score_at_rollout:2", "scores"),
                                            ("nan_advantage_at_rollout:2", "advantages")])
def test_nan_in_a_ppo_rollout_names_the_quantity(tmp_path, exports, fault, quantity):
    run_dir = tmp_path / "ppo"
    done = train_with_fault(fault, [
        "stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
        f"reward.path={exports / 'rm' / 'export'}", "stage.datamodule.batch_size=8", "stage.rollouts=4",
        "stage.eval.num_prompts=8", "reward.normalize.init_rollouts=1", "callbacks.checkpoint.every_n_steps=8",
        *SMALL_DEMO, f"hydra.run.dir={run_dir}"])
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith(f"error: ppo stage, step 8: {quantity} is nan; stopped before")
    assert _checkpoints(run_dir) == ["step-00000008.ckpt"]


def test_nan_gradient_in_the_reward_model_stops_before_the_step(tmp_path):
    run_dir = tmp_path / "rm"
    done = train_with_fault("nan_gradient_at_step:7", [
        "stage=rm", "data=demo_pref", "trainer.max_steps=20", "callbacks.checkpoint.every_n_steps=5",
        "trainer.val_check_interval=20", *SMALL, f"hydra.run.dir={run_dir}"])
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith("error: rm stage, step 6: gradient_norm is nan; stopped before")
    assert _checkpoints(run_dir) == ["step-00000005.ckpt"]
    state = torch.load(run_dir / "checkpoints" / "step-00000005.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (run_dir / "export").exists()


def _interrupt_and_resume(run_dir, args, signum, code, more_steps):
    process = start_train(args)
    deadline = time.time() + 120
    while not (run_dir / "tb").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(2.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    checkpoints = _checkpoints(run_dir)
    assert len(checkpoints) == 1
    name = signal.Signals(signum).name
    assert stderr.splitlines()[-1] == (f"interrupted by {name}: saved {run_dir / 'checkpoints' / checkpoints[0]}; "
                                       f"continue with: python train.py resume={run_dir}")
    resumed = train_cli([f"resume={run_dir}", more_steps(int(checkpoints[0][5:13]))])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return int(checkpoints[0][5:13]), json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_a_checkpoint_and_say_how_to_resume(tmp_path, signum, code):
    run_dir = tmp_path / "run"
    args = ["stage=sft", "trainer.max_steps=100000", "callbacks.checkpoint.every_n_steps=100000",
            "trainer.val_check_interval=100000", "stage.eval.at_start=false", *SMALL, f"hydra.run.dir={run_dir}"]
    step, record = _interrupt_and_resume(run_dir, args, signum, code, lambda step: f"trainer.max_steps={step + 5}")
    assert record["global_step"] == step + 5


def test_sigterm_during_ppo_saves_the_rollout_state_and_resumes(tmp_path, exports):
    run_dir = tmp_path / "ppo"
    args = ["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", "stage.datamodule.batch_size=8", "stage.rollouts=100000",
            "stage.eval.at_start=false", "reward.normalize.init_rollouts=1", "callbacks.checkpoint.every_n_steps=100000",
            "trainer.val_check_interval=100000", *SMALL_DEMO, f"hydra.run.dir={run_dir}"]
    step, record = _interrupt_and_resume(run_dir, args, signal.SIGTERM, 143,
                                         lambda step: f"stage.rollouts={step // 8 + 2}")
    assert record["status"] == "completed" and record["global_step"] == step + 2 * 8  # 8 optimizer steps a rollout


def test_unwritable_output_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = train_cli(["stage=sft", f"hydra.run.dir={blocker / 'run'}"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {blocker / 'run'}: cannot write the run directory there "
                                        "(Not a directory)"]


def test_missing_or_wrong_exports_between_stages(tmp_path, exports):
    ppo = ["stage=ppo", "data=demo_prompts", *SMALL_DEMO, f"hydra.run.dir={tmp_path / 'run'}"]
    cases = [
        ([f"policy.init={tmp_path / 'nothing'}", f"reward.path={exports / 'rm' / 'export'}"],
         f"error: config policy.init: {tmp_path / 'nothing'} is not a model directory"),
        ([f"policy.init={exports / 'sft' / 'export'}", f"reward.path={exports / 'sft' / 'export'}"],
         f"error: config reward.path: {exports / 'sft' / 'export'} is a causal_lm export (from stage 'sft'), "
         "not a reward model"),
        ([f"policy.init={exports / 'rm' / 'export'}", f"reward.path={exports / 'rm' / 'export'}"],
         f"error: config policy.init: {exports / 'rm' / 'export'} is a reward_model export (from stage 'rm'), "
         "not a causal language model"),
        (["reward.path=null"],
         "error: config reward.path: is required (a reward-model export) unless reward.components defines the reward"),
    ]
    # the first through train.py (exit status 2, one line), the others in this process: the same checks
    args, message = cases[0]
    done = train_cli(ppo + args)
    assert done.returncode == 2 and done.stderr.splitlines() == [message], (args, done.stderr[-1500:])
    for args, message in cases[1:]:
        with pytest.raises(UserError) as error:
            run_in_process(ppo[:-1] + args, tmp_path / "in_process")
        assert f"error: {error.value}" == message


def test_out_of_range_ppo_settings_name_their_key(tmp_path, exports):
    base = ["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = train_cli(base + ["stage.ppo.clip_range=0"])
    assert done.returncode == 2 and done.stderr.splitlines() == ["error: config stage.ppo.clip_range: must be > 0, got 0.0"]


def test_custom_model_code_is_not_run_unless_asked(tmp_path, tiny_spec):
    """A model directory that needs code from its repository is refused without trust_remote_code."""
    import shutil
    from dataclasses import replace

    from lightrlhf.models.loading import load_base_model

    model_dir = tmp_path / "custom"
    shutil.copytree(tiny_spec.name_or_path, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    config["model_type"] = "custom_llama"
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="needs custom code from the model repository; set "
                                        "model.trust_remote_code=true if you trust it"):
        load_base_model(replace(tiny_spec, name_or_path=str(model_dir)))


@pytest.mark.parametrize("stage", [["stage=sft", "stage.eval.num_prompts=16"], ["stage=rm", "data=demo_pref"]],
                         ids=["sft", "rm"])
def test_a_diverged_run_in_skip_mode_stops_after_max_consecutive_skips(tmp_path, stage):
    """lr=1e30: after the first step every batch is NaN. Lightning still calls the clipping hook around
    each skipped step; that must not count as a good batch, nor may a finite loss whose gradient is not."""
    done = train_cli(stage + ["numerics.on_nonfinite=skip", "stage.optim.lr=1e30", "trainer.max_steps=60",
                              "trainer.val_check_interval=20", *SMALL, f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 3, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stdout + done.stderr, done.stderr[-2000:]
    name = stage[0].split("=")[1]
    # step 0 is taken (finite), steps 1-4 are not finite: the fourth bad batch in a row stops the run
    assert re.fullmatch(rf"error: {name} stage, step 4: \w+ is (nan|inf); 4 batches in a row were not finite "
                        r"\(numerics.max_consecutive_skips=3\): stopping", lines[0]), lines[0]


def test_evaluation_of_a_diverged_model_is_one_line_not_a_sampling_traceback(tmp_path):
    done = train_cli(["stage=sft", "numerics.on_nonfinite=skip", "numerics.max_consecutive_skips=100",
                      "stage.optim.lr=1e30", "trainer.max_steps=60", "trainer.val_check_interval=8",
                      "callbacks.checkpoint.every_n_steps=1000", "stage.eval.num_prompts=16", *SMALL,
                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 3, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-2000:]
    # before it, torchmetrics warns that the validation loss had NaN in it (a warning, not an error)
    assert done.stderr.splitlines()[-1] == (
        "error: sampling: the model's next-token logits are nan in 16 of 16 rows; its weights or activations are "
        "not finite (a diverged run?), so nothing can be sampled"), done.stderr[-2000:]


def test_the_skip_limit_counts_a_bad_gradient_after_a_finite_loss_and_ignores_the_empty_clipping_hook():
    from types import SimpleNamespace

    from lightrlhf.training.numerics import NonFiniteGuard, NumericFault, NumericsSpec, guard_and_clip

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    stage = SimpleNamespace(guard=NonFiniteGuard(NumericsSpec(on_nonfinite="skip", max_consecutive_skips=3), "sft"),
                            global_step=0, clip_gradients=lambda *args, **kwargs: None)
    nan, fine = torch.tensor(float("nan")), torch.tensor(1.0)

    def batch(loss: torch.Tensor, grad: float | None) -> None:
        """training_step's screen, then what Lightning calls before the optimizer step."""
        stage.global_step += 1
        if stage.guard.screen(stage.global_step, loss=loss):
            param.grad = torch.full((3,), grad)
        guard_and_clip(stage, optimizer, 1.0)
        param.grad = None  # Lightning's zero_grad

    batch(fine, 1.0)
    assert stage.guard.skipped_in_a_row == 0
    batch(nan, None)  # skipped before its backward: the hook finds no gradient, which is no good batch
    batch(fine, float("inf"))  # a finite loss does not vouch for its gradient
    batch(nan, None)
    assert (stage.guard.skipped_in_a_row, stage.guard.skipped_total) == (3, 3)
    with pytest.raises(NumericFault, match=r"^sft stage, step 5: gradient_norm is inf; 4 batches in a row"):
        batch(fine, float("inf"))
    stage.guard.skipped_in_a_row, param.grad = 0, None
    batch(nan, None)
    batch(fine, 1.0)  # an optimizer step with a finite gradient ends the run of skips
    assert stage.guard.skipped_in_a_row == 0


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampling_from_non_finite_logits_is_a_numeric_fault(temperature):
    from lightrlhf.rl.next_token import sample_tokens
    from lightrlhf.training.numerics import NumericFault

    logits = torch.zeros(4, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(NumericFault, match=r"^sampling: the model's next-token logits are nan in 1 of 4 rows; its "
                                           r"weights or activations are not finite \(a diverged run\?\), so nothing "
                                           r"can be sampled$") as caught:
        sample_tokens(logits, temperature)
    assert caught.value.exit_code == 3
    logits = torch.zeros(4, 10)
    logits[0] = float("-inf")
    logits[2, 0] = float("inf")
    with pytest.raises(NumericFault, match=r"logits are inf in 2 of 4 rows"):
        sample_tokens(logits, temperature)
    logits[0, 1], logits[2, 0] = 0.0, float("-inf")  # some tokens ruled out is an ordinary distribution
    assert sample_tokens(logits, temperature)[0] == 1
