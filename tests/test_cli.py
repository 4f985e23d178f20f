"""The real entry point in a subprocess: help, composed config, a run and its resume, user errors."""

from __future__ import annotations

import json

import pytest
from conftest import SMALL_DEMO, scalar_curve, train_cli

pytestmark = pytest.mark.slow
FAST = ["stage.eval.num_prompts=32", "trainer.val_check_interval=10", "callbacks.checkpoint.every_n_steps=10",
        "stage.datamodule.batch_size=8", *SMALL_DEMO]


def test_help_lists_the_config_groups():
    done = train_cli(["--help"])
    assert done.returncode == 0
    for group in ("stage:", "model:", "data:", "trainer:", "logger:", "callbacks:"):
        assert group in done.stdout


def test_cfg_job_prints_the_composed_config():
    done = train_cli(["stage=sft", "model=tiny", "data=demo_sft", "--cfg", "job"])
    assert done.returncode == 0, done.stderr
    assert "_target_: lightrlhf.stages.sft.SFTStage" in done.stdout and "max_steps: 300" in done.stdout


def _steps(run_dir, tag):
    return [step for step, _ in scalar_curve(run_dir, tag)]


def test_run_then_resume_in_place_with_more_steps(tmp_path):
    run_dir = tmp_path / "run"
    done = train_cli(["stage=sft", "model=tiny", "data=demo_sft", "trainer.max_steps=20", f"hydra.run.dir={run_dir}"] + FAST)
    assert done.returncode == 0, done.stderr
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["global_step"] == 20 and (run_dir / "export" / "lightrlhf.json").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    # a key of the run's own stage is accepted on resume (the default config's stage is the pipeline)
    done = train_cli([f"resume={run_dir}", "trainer.max_steps=40", "stage.max_grad_norm=0.5"])
    assert done.returncode == 0, done.stderr
    assert "Restored all states" in done.stdout + done.stderr
    second = json.loads((run_dir / "metrics.json").read_text())
    assert second["global_step"] == 40 and second["stage"] == "sft"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["launches"] == 2 and {"trainer.max_steps=40", "stage.max_grad_norm=0.5"} <= set(record["overrides"])
    steps = _steps(run_dir, "train/loss")
    assert steps == sorted(set(steps)) and max(steps) >= 39, steps  # one curve, no step twice
    assert not (run_dir / ".hydra" / "overrides.yaml").read_text().count("resume")

    refused = train_cli([f"resume={run_dir}", "stage=rm"])
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == ["error: resume: cannot change stage of an existing run (it was stage=sft); "
                                           "start a new run instead"]
    assert json.loads((run_dir / "run.json").read_text())["launches"] == 2


def test_a_directory_holding_a_run_is_not_reused_without_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert train_cli(["stage=sft", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"] + FAST).returncode == 0
    done = train_cli(["stage=sft", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"] + FAST)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {run_dir} already holds a run; continue it with resume={run_dir}, or choose a new hydra.run.dir"


def _bad_files(tmp_path):
    files = {
        "malformed.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n',
        "missing.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
        "wrongtype.jsonl": b'{"prompt": "a", "completion": 7}\n',
        "latin1.jsonl": '{"prompt": "caf\u00e9", "completion": "b"}\n'.encode("latin-1"),
        "empty.jsonl": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "empty").mkdir()
    return tmp_path


BAD_INPUTS = [
    (["data=jsonl", "data.path={d}/nope.jsonl"], "error: {d}/nope.jsonl: no such file"),
    (["data=jsonl", "data.path={d}/malformed.jsonl"], "error: {d}/malformed.jsonl:2: invalid JSON (Expecting ',' delimiter, column 16)"),
    (["data=jsonl", "data.path={d}/missing.jsonl"], 'error: {d}/missing.jsonl:2: field "completion" is missing'),
    (["data=jsonl", "data.path={d}/wrongtype.jsonl"], 'error: {d}/wrongtype.jsonl:1: field "completion" must be a string or a list of {{role, content}} messages, got number'),
    (["data=jsonl", "data.path={d}/latin1.jsonl"], "error: {d}/latin1.jsonl: not valid UTF-8 (byte 0xe9 at line 1)"),
    (["data=jsonl", "data.path={d}/empty.jsonl"], "error: {d}/empty.jsonl: the file is empty"),
    (["data=jsonl"], "error: config data.path: Missing mandatory value: path"),
    (["model.lora.r=0"], "error: config model.lora.r: must be > 0, got 0"),
    (["model.dtype=float8"], "error: config model.dtype: expected one of 'float32', 'bfloat16', 'float16', got str 'float8'"),
    (["trainer.max_steps=ten"], "error: config trainer.max_steps: expected int, got str 'ten'"),
    (["stage.datamodule.packing=maybe"], "error: config stage.datamodule.packing: expected bool, got str 'maybe'"),
    (["stage.optim.lr=-0.1"], "error: config stage.optim.lr: must be > 0, got -0.1"),
    (["+stage.learning_rate=0.1"], "error: config stage.learning_rate: unknown key for SFTStage"),
    (["stage.learning_rate=0.1"], "error: config: Could not override 'stage.learning_rate'. Key 'learning_rate' is not in struct"),
    (["model=gpt3"], "error: config: In 'train': Could not find 'model/gpt3' Available options in 'model': gpt2 llama3_2_1b qwen2_5_0_5b tiny tiny_bert_zh tiny_zh"),
    (["ckpt_path={d}/none.ckpt"], "error: config ckpt_path: {d}/none.ckpt is not a checkpoint file"),
    (["resume={d}"], "error: resume={d}: no run to resume there (no run.json; is it the directory of a lightrlhf run?)"),
    (["stage._target_=argparse.Namespace"], "error: config stage._target_: argparse.Namespace does not implement the "
     "stage contract (lightrlhf.stages.base.Stage): missing default_metric, last_validated_step, final_metrics, export, "
     "trainable_parameter_names"),
    (["stage=ppo", "data=demo_prompts", "policy.init={d}/empty", "reward.path={d}/empty"],
     "error: config policy.init: {d}/empty: no weight files (*.safetensors or *.bin) in this model directory"),
    (["data.format=bogus"], "error: config data.format: must be one of auto, prompt_completion, messages, alpaca, "
     "explicit, ultrafeedback, conversational, hh_rlhf, implicit, prompt; got 'bogus'"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    data_dir = _bad_files(tmp_path)
    run_dir = tmp_path / "run"
    args = [a.format(d=data_dir) for a in args]
    if not any(a.startswith("resume=") for a in args):
        args += ["stage=sft", f"hydra.run.dir={run_dir}"] if not any(a.startswith("stage=") for a in args) \
            else [f"hydra.run.dir={run_dir}"]
    done = train_cli(args)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.splitlines() == [message.format(d=data_dir)]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (run_dir / "export").exists() and not (run_dir / "run.json").exists()
