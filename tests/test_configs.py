"""Every YAML under conf/ is composed and instantiated, so a shipped config can never rot unseen."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, FIXTURES, compose
from lightrlhf.launch.build import build
from lightrlhf.launch.run import _settings, to_plain

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
# Options that need a value the shipped file leaves to the user (`???`).
REQUIRED = {("data", "jsonl"): [f"data.path={FIXTURES / 'data' / 'sft_prompt_completion.jsonl'}"],
            ("stage", "rm"): ["data=demo_pref"], ("data", "demo_pref"): ["stage=rm"]}
# GPU configs are built with the accelerator swapped for the CPU (everything else as shipped);
# the composed value itself is checked separately below.
ON_CPU = {("trainer", "gpu"): ["trainer.accelerator=cpu"]}
# Groups whose files are applied as overrides of the whole config (`# @package _global_`).
GLOBAL_GROUPS = {"experiment", "hparams_search"}


def options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


def _needs_exports(group: str, option: str) -> bool:
    return (group, option) in (("stage", "ppo"), ("data", "demo_prompts"))


@pytest.mark.parametrize("group,option", list(options()), ids=lambda v: str(v))
def test_every_config_composes_and_builds(group, option, tmp_path, request):
    extra = REQUIRED.get((group, option), []) + ON_CPU.get((group, option), [])
    if _needs_exports(group, option):  # PPO starts from an SFT export and a reward model
        exports = request.getfixturevalue("exports")
        extra += ["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
                  f"reward.path={exports / 'rm' / 'export'}"]
    cfg = compose([f"{group}={option}"] + extra, tmp_path)
    plain = to_plain(cfg)
    _settings(plain)
    node = plain[group] if group not in GLOBAL_GROUPS else plain
    if group in GLOBAL_GROUPS:
        return  # composed above; its parts are built by the tests of those groups
    if group == "stage" or _needs_exports(group, option):
        _build_stage_parts(plain)
    elif group in ("logger", "callbacks"):
        built = [build(n, f"{group}.{k}") for k, n in node.items() if n]
        assert built
    else:
        built = build(node, group)
        assert built is not None


def _build_stage_parts(plain):
    """A stage node needs its model and data: build them the way `train.py` does."""
    from lightrlhf.launch.run import build_stage

    stage, datamodule = build_stage(plain)
    assert stage.datamodule is datamodule


def test_hydra_group_composes(tmp_path):
    cfg = compose([], tmp_path)
    assert OmegaConf.select(cfg, "resume") is None


def test_real_model_configs_describe_loadable_models(tmp_path):
    """Hub models cannot be downloaded here; their configs must still be complete and valid."""
    for name in ("gpt2", "qwen2_5_0_5b", "llama3_2_1b"):
        spec = build(to_plain(compose([f"model={name}"], tmp_path))["model"], "model")
        assert spec.name_or_path and spec.lora is not None and not spec.trust_remote_code


def test_gpu_trainer_config_asks_for_a_gpu(tmp_path):
    trainer = to_plain(compose(["trainer=gpu"], tmp_path))["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
