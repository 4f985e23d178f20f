"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import train_cli, train_with_fault
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ARGS = ["stage=sft", "model=tiny", "data=demo_sft", "trainer.max_steps=40", "trainer.val_check_interval=20",
        "callbacks.checkpoint.every_n_steps=10", "stage.eval.num_prompts=64", "model.lora.r=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "straight"
    done = train_cli(ARGS + [f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr
    return run_dir


def _assert_same_result(a, b):
    weights_a = load_file(a / "export" / "adapter_model.safetensors")
    weights_b = load_file(b / "export" / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    metrics_a = json.loads((a / "metrics.json").read_text())["metrics"]
    metrics_b = json.loads((b / "metrics.json").read_text())["metrics"]
    assert metrics_a == metrics_b


def test_killed_after_a_checkpoint_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    killed = train_with_fault("kill_after_checkpoint:2", ARGS + [f"hydra.run.dir={run_dir}"])
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_result(uninterrupted, run_dir)


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(uninterrupted, tmp_path):
    run_dir = tmp_path / "torn"
    killed = train_with_fault("kill_during_checkpoint:3", ARGS + [f"hydra.run.dir={run_dir}"])
    assert killed.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*.ckpt")) == ["step-00000010.ckpt", "step-00000020.ckpt"]
    assert [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")], "the torn write should be a temp file"
    torch.load(checkpoints / "step-00000020.ckpt", weights_only=True)  # intact
    resumed = train_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_result(uninterrupted, run_dir)
