"""`lightrlhf.launch` reads as a straight line: modules that import each other without a circle, a
short `run.py`, stages used through their contract, one composition per pipeline step."""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose

LAUNCH = ROOT / "src" / "lightrlhf" / "launch"
PACKAGE = "lightrlhf.launch"


def _module_name(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def _launch_imports(path: Path, modules: set[str]) -> set[str]:
    """The launch modules `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= (named & modules) or ({node.module} & modules)
    return found - {_module_name(path)}


def test_launch_modules_import_each_other_without_a_circle():
    files = sorted(LAUNCH.glob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _launch_imports(p, modules) for p in files}
    assert graph[f"{PACKAGE}.run"] >= {f"{PACKAGE}.record", f"{PACKAGE}.pipeline"}  # the parse sees imports
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import circle inside lightrlhf.launch: {' -> '.join(error.args[1])}")


def test_run_py_is_a_short_straight_line():
    assert len((LAUNCH / "run.py").read_text().splitlines()) <= 150


def test_importing_launch_loads_no_heavy_library():
    """`--help` and config errors answer before torch and Lightning load."""
    code = "import sys, lightrlhf.launch; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


# -- the stage contract ----------------------------------------------------------------------------
STAGES = {"sft": (["stage=sft"], "SFTStage"), "rm": (["stage=rm", "data=demo_pref"], "RewardModelStage"),
          "ppo": (["stage=ppo", "data=demo_prompts"], "PPOStage"),
          "grpo": (["stage=grpo", "data=demo_prompts"], "GRPOStage"),
          "rloo": (["stage=rloo", "data=demo_prompts"], "GRPOStage")}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_shipped_stage_keeps_the_stage_contract(name, tmp_path, request):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain
    from lightrlhf.stages.base import Stage

    overrides, class_name = STAGES[name]
    if name in ("ppo", "grpo", "rloo"):  # online stages start from an SFT export and a reward model
        exports = request.getfixturevalue("exports")
        overrides = overrides + [f"policy.init={exports / 'sft' / 'export'}",
                                 f"reward.path={exports / 'rm' / 'export'}"]
    stage, _ = build_stage(to_plain(compose(overrides, tmp_path)))
    assert type(stage).__name__ == class_name and isinstance(stage, Stage)
    assert stage.default_metric and stage.last_validated_step == -1


def test_a_target_that_is_not_a_stage_is_a_one_line_config_error(tmp_path):
    from lightrlhf.errors import ConfigError
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    plain = to_plain(compose(["stage=sft", "stage._target_=argparse.Namespace"], tmp_path))
    with pytest.raises(ConfigError) as raised:
        build_stage(plain)
    assert str(raised.value) == ("config stage._target_: argparse.Namespace does not implement the stage contract "
                                 "(lightrlhf.stages.base.Stage): missing default_metric, last_validated_step, "
                                 "final_metrics, export, trainable_parameter_names")


# -- the pipeline: one composition per step ---------------------------------------------------------
@pytest.fixture
def compositions(monkeypatch):
    """Every config composition from here on, as the list of overrides it was asked for."""
    import hydra

    made: list[list[str]] = []
    real = hydra.compose

    def counting(*args, **kwargs):
        made.append(list(kwargs.get("overrides") or []))
        return real(*args, **kwargs)

    monkeypatch.setattr(hydra, "compose", counting)
    return made


def _without_training(seen: dict):
    """A step runner that does what `run_stage` does up to the training: its config, resumed or new."""
    from lightrlhf.launch import record

    def run_step(cfg, step_dir, overrides, choices, config_name):
        cfg, overrides, choices = record.this_run(cfg, step_dir, overrides, choices, config_name)
        step_dir.mkdir(parents=True, exist_ok=True)
        record.write_record(step_dir, overrides, choices, cfg)
        seen[step_dir.name] = (cfg, overrides)
        (step_dir / "metrics.json").write_text(json.dumps({"status": "completed", "stage": choices["stage"]}))

    return run_step


def _composed(overrides: list[str]):
    """What Hydra hands `run`: the config without its own node, the overrides, the group choices."""
    from hydra import compose as hydra_compose
    from omegaconf import open_dict

    cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, overrides, choices


def test_the_chinese_demo_runs_every_step_on_its_own_base_model(tmp_path, compositions):
    """`python train.py demo=zh`: demo=zh picks model=tiny_zh for every step (conf/demo/zh.yaml), and an
    explicit model= on the command line still wins."""
    from hydra import initialize_config_dir

    from lightrlhf.launch.pipeline import run_pipeline

    for given, model in ((["demo=zh"], "tiny_zh"), (["demo=zh", "model=tiny"], "tiny")):
        run_dir = tmp_path / model
        seen: dict = {}
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg, overrides, choices = _composed(given + [f"paths.output_dir={run_dir}"])
            run_pipeline(cfg, run_dir, overrides, choices, "train", run_step=_without_training(seen))
        sft, rm, ppo = (seen[name][0] for name in ("sft", "rm", "ppo"))
        assert all(c.demo.language == "zh" for c in (sft, rm, ppo))
        assert sft.model.name_or_path.endswith(f"assets/{model}") and ppo.model.name_or_path.endswith(f"assets/{model}")
        assert rm.model.name_or_path == f"{run_dir}/sft/export"  # the step's own override still wins


def test_pipeline_composes_each_step_once_with_the_global_overrides_that_apply(tmp_path, compositions, caplog):
    from hydra import initialize_config_dir

    from lightrlhf.launch import record
    from lightrlhf.launch.pipeline import run_pipeline

    run_dir = tmp_path / "demo"
    given = ["seed=3", "trainer=cpu", "demo.annotator.length_bias=0.2", "++reward.clip=5.0",
             'pipeline.extra.sft=["seed=5"]']
    seen: dict = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), caplog.at_level("INFO", "lightrlhf"):
        cfg, overrides, choices = _composed(given + [f"paths.output_dir={run_dir}"])
        del compositions[:]
        run_pipeline(cfg, run_dir, overrides, choices, "train", run_step=_without_training(seen))
        assert len(compositions) == 3

        sft, rm, ppo = (seen[name][0] for name in ("sft", "rm", "ppo"))
        assert (sft.seed, rm.seed, ppo.seed) == (5, 3, 3)  # the step's extra wins over the global override
        assert all(c.demo.annotator.length_bias == 0.2 for c in (sft, rm, ppo))
        assert ppo.reward.clip == 5.0 and "reward" not in sft and "reward" not in rm  # only PPO has a reward
        assert all(c.trainer.accelerator == "cpu" for c in (sft, rm, ppo))
        assert seen["rm"][1] == ["stage=rm", "data=demo_pref", f"model.name_or_path={run_dir}/sft/export",
                                 "trainer.max_steps=1000", "seed=3", "trainer=cpu", "demo.annotator.length_bias=0.2",
                                 f"paths.output_dir={run_dir}/rm"]
        assert "pipeline step rm: override ++reward.clip=5.0 does not apply to it" in caplog.messages

        # resumed: the first step is done, the second was interrupted, the third never started
        (run_dir / "rm" / "metrics.json").unlink()
        for path in (run_dir / "ppo").iterdir():
            path.unlink()
        # as `python train.py resume=<run dir>`: the recorded overrides first, then the given ones
        cfg, overrides, choices = _composed(record.with_recorded_overrides(["train.py", f"resume={run_dir}"])[1:])
        del compositions[:]
        seen.clear()
        cfg, overrides, choices = record.this_run(cfg, run_dir, overrides, choices, "train")
        run_pipeline(cfg, run_dir, overrides, choices, "train", run_step=_without_training(seen))
    assert len(compositions) == 2 and sorted(seen) == ["ppo", "rm"]
    assert seen["rm"][0].resume == str(run_dir / "rm") and seen["ppo"][0].resume is None
    assert json.loads((run_dir / "rm" / "run.json").read_text())["launches"] == 2
