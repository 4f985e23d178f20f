"""Every YAML under conf/ is composed and instantiated, so a shipped config can never rot unseen."""

from __future__ import annotations

import pytest
from conftest import CONF, FIXTURES, compose
from omegaconf import OmegaConf

from lightrlhf.launch.build import build
from lightrlhf.launch.run import _settings, to_plain

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
# Options that need a value the shipped file leaves to the user (`???`).
REQUIRED = {("data", "jsonl"): [f"data.path={FIXTURES / 'data' / 'sft_prompt_completion.jsonl'}"],
            ("stage", "rm"): ["data=demo_pref"], ("data", "demo_pref"): ["stage=rm"],
            ("data", "demo_labels"): ["stage=rm", f"data.path={FIXTURES / 'data' / 'pref_explicit.jsonl'}"],
            ("stage", "label"): [f"stage.candidates={FIXTURES / 'data' / 'candidates_demo.jsonl'}"],
            # the masked LM's stage: its model, the Chinese demo's prompts, a rule for the reward
            ("stage", "reward_weighted_mlm"): [
                "model=tiny_bert_zh", "demo=zh", "data=demo_prompts",
                "+reward.components.full_stop={_target_:lightrlhf.rewards.spec.Component,"
                "fn:{_target_:lightrlhf.rewards.functions.contains,_partial_:true,pattern:'。'}}"]}
# GPU configs are built with the accelerator swapped for the CPU (everything else as shipped);
# the composed value itself is checked separately below.
ON_CPU = {("trainer", "gpu"): ["trainer.accelerator=cpu"]}
# Configs that need a GPU or an optional package to instantiate: every node is still checked
# against its target's signature (importable, known keys, value types) without being called.
VALIDATE_ONLY = {("trainer", "fsdp"), ("trainer", "deepspeed"), ("logger", "wandb")}
# Groups whose files are applied as overrides of the whole config (`# @package _global_`).
GLOBAL_GROUPS = {"experiment", "hparams_search"}
# Groups whose files are placed elsewhere than under their own name (`# @package demo.annotator`).
PACKAGES = {"annotator": "demo.annotator"}


def options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


ONLINE_STAGES = ("ppo", "grpo", "rloo", "reward_weighted", "best_of_n", "sample_pairs")  # start from an SFT export and a reward model
REWARD_KEY = {"sample_pairs": "stage.reward_model"}  # where the stage takes its reward model (else reward.path)


def _needs_exports(group: str, option: str) -> bool:
    return (group == "stage" and option in ONLINE_STAGES) or (group, option) == ("data", "demo_prompts")


@pytest.mark.parametrize("group,option", list(options()), ids=lambda v: str(v))
def test_every_config_composes_and_builds(group, option, tmp_path, request):
    extra = REQUIRED.get((group, option), []) + ON_CPU.get((group, option), [])
    if _needs_exports(group, option):  # PPO, GRPO, RLOO start from an SFT export and a reward model
        exports = request.getfixturevalue("exports")
        stage = option if group == "stage" else "ppo"
        extra += [f"stage={stage}", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
                  f"{REWARD_KEY.get(stage, 'reward.path')}={exports / 'rm' / 'export'}"]
    cfg = compose([f"{group}={option}"] + extra, tmp_path)
    plain = to_plain(cfg)
    _settings(plain)
    key, node = PACKAGES.get(group, group), plain
    if group not in GLOBAL_GROUPS:
        for part in key.split("."):
            node = node[part]
    if group in GLOBAL_GROUPS:
        return  # composed above; its parts are built by the tests of those groups
    if (group, option) in VALIDATE_ONLY:
        from lightrlhf.launch.build import validate

        validate(node, group)
        return
    if (group, option) == ("stage", "pipeline"):
        from lightrlhf.launch.pipeline import PipelineSpec

        assert [s.name for s in PipelineSpec.from_config(plain["pipeline"]).steps] == ["sft", "rm", "ppo"]
    elif group == "stage" or _needs_exports(group, option):
        _build_stage_parts(plain)
    elif group in ("logger", "callbacks"):
        built = [build(n, f"{group}.{k}") for k, n in node.items() if n]
        assert built
    else:
        built = build(node, key)
        assert built is not None


def _build_stage_parts(plain):
    """A stage node needs its model and data: build them the way `train.py` does."""
    from lightrlhf.launch.parts import build_stage

    stage, datamodule = build_stage(plain)
    if plain.get("env") is not None:  # a control stage (stage=pbrl): its loop is its own, no data
        assert datamodule is None and stage.env_spec.task == plain["env"]["task"]
        return
    assert getattr(stage, "datamodule", None) is datamodule  # none for a stage without data (label)


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


def test_cluster_configs_compose(tmp_path):
    """The GPU strategies and the SLURM launcher: composed with the values a cluster run would use."""
    fsdp = to_plain(compose(["trainer=fsdp"], tmp_path))["trainer"]
    assert fsdp["strategy"]["use_orig_params"] is True and fsdp["precision"] == "bf16-mixed"
    deepspeed = to_plain(compose(["trainer=deepspeed"], tmp_path))["trainer"]
    assert deepspeed["strategy"]["stage"] == 2
    ddp = to_plain(compose(["trainer=ddp"], tmp_path))["trainer"]
    assert ddp["devices"] == 2 and ddp["strategy"]["_target_"].endswith("DDPStrategy")


@pytest.mark.parametrize("launcher_name", ["slurm", "submitit_slurm"])
def test_slurm_launcher_composes(launcher_name):
    """`slurm` is the plugin's `submitit_slurm` with one-GPU-job defaults; the plain plugin config works too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"hydra/launcher={launcher_name}", "stage=sft"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    if launcher_name == "slurm":
        assert launcher.timeout_min == 240 and launcher.gpus_per_node == 1


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_pipeline_step_of_every_experiment_composes_and_checks(experiment, tmp_path):
    """A recipe whose model or data cannot be downloaded here is still composed step by step, and
    every node is checked against its target's signature."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightrlhf.launch.build import validate
    from lightrlhf.launch.pipeline import PipelineSpec

    plain = to_plain(compose([f"experiment={experiment}"], tmp_path))
    spec = PipelineSpec.from_config(plain["pipeline"])
    dirs = {s.name: str(tmp_path / s.name) for s in spec.steps}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        checked_seeded = set()
        for step in spec.steps:
            if step.seed is not None:  # a step's seeds share its overrides (the seed is applied when it runs)
                if (step.group, tuple(step.overrides)) in checked_seeded:
                    continue  # composed and checked as its first seed
                checked_seeded.add((step.group, tuple(step.overrides)))
            overrides = [o.format(**dirs) for o in step.overrides] + [f"paths.output_dir={tmp_path / step.name}"]
            step_plain = to_plain(hydra_compose("train", overrides=overrides))
            _settings(step_plain)
            roles = ("policy", "value", "reward", "numerics")
            for part in ("model", "data", "trainer") + roles:
                if step_plain.get(part) is not None:
                    validate(step_plain[part], part)
            stage = dict(step_plain["stage"])
            if "model" in stage:  # a stage without model and data (label) has its own keys alone
                validate(stage.pop("model"), "stage.model", given=("spec", "tokenizer") + roles)
                validate(stage.pop("datamodule"), "stage.datamodule", given=("source", "tokenizer"))
            validate(stage, "stage", given=("model", "datamodule") + roles)
