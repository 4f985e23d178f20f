"""Several stages in one run directory, each stage taking the previous stages' exports.

    <run dir>/
      sft/ rm/ ppo/      one ordinary run directory per step (config, checkpoints, export, metrics)
      summary.json       each step's key metrics and wall time, and the gold score along the way

A pipeline is `stage=pipeline` plus a `pipeline.steps` list (conf/experiment/demo.yaml): each step
is a name and the overrides that run it, where `{name}` stands for an earlier step's directory
(`policy.init={sft}/export`). Overrides given on the command line apply to every step whose
config has that key (`seed=1`, `demo.annotator.length_bias=0.2`); `pipeline.extra.<step>` adds
overrides to one step only.

A step with `seeds: [0, 1, 2]` runs once per seed, as `<name>_seed<s>` with `seed=<s>` (which wins over
a `seed=` on the command line; the steps it depends on run once). With `pipeline.parallel` > 1 that
many seeded steps run at once, each as its own train.py process (launch/parallel.py); an unseeded step
waits for them. A pipeline with seeded steps also writes a ranking of them (launch/ranking.py:
`ranking.md`, `ranking.json`, `ranking.png`), as `experiment=method_ranking` does.

A step that already finished is not run again; a step that was interrupted is resumed from its
last checkpoint -- so `python train.py resume=<run dir>` continues a killed pipeline where it was.

Instead of `steps`, `pipeline.loop` may name an object that writes the steps out (launch/loops.py:
the iterated RLHF loop, the active-selection experiment) and reports on them at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightrlhf.callbacks.checkpoint import RunInterrupted
from lightrlhf.errors import ConfigError
from lightrlhf.io import atomic_write_text
from lightrlhf.launch.parallel import StepProcesses, entry_script, forwarding_signals
from lightrlhf.launch.ranking import FROM_SFT, write_ranking
from lightrlhf.launch.record import RUN_RECORD, compose_config, override_key, unclaim, write_record
from lightrlhf.launch.report import METRICS_FILE

log = logging.getLogger("lightrlhf")
SUMMARY_FILE = "summary.json"
# What runs one step: `run.run_stage(cfg, step_dir, overrides, choices, config_name)`.
StepRunner = Callable[[DictConfig, Path, list[str], dict[str, Any], str], Any]
_ABSENT = object()
# config groups whose files are packaged under another node than their own name (conf/annotator/*.yaml
# are `# @package demo.annotator`): a step has the group when it has that node
GROUP_NODES = {"annotator": "demo.annotator"}


@dataclass(frozen=True)
class Step:
    name: str
    overrides: list[str]
    group: str = ""  # a seeded step's name in the config (`dpo` for `dpo_seed1`); else its own name
    seed: int | None = None
    fixed: tuple[str, ...] = ()  # overrides that win over the command line's (a loop's seed per chain)
    concurrent: bool = False  # a loop's step that may run beside the others like it (pipeline.parallel)

    @property
    def runs_beside(self) -> bool:
        """May run at once with the other such steps: a seeded step, or a loop's concurrent one."""
        return self.seed is not None or self.concurrent


@dataclass(frozen=True)
class PipelineSpec:
    steps: list[Step]
    extra: dict[str, list[str]] = field(default_factory=dict)
    parallel: int = 1  # seeded steps at once, each a process of its own (launch/parallel.py)
    loop: Any = None  # what wrote the steps (launch/loops.py); its report(run_dir, results) ends the run

    @classmethod
    def from_config(cls, node: Any) -> PipelineSpec:
        if node and node.get("loop") is not None:
            if node.get("steps"):
                raise ConfigError("pipeline.loop", "give pipeline.steps or pipeline.loop, not both")
            from lightrlhf.launch.build import build

            loop = build(node["loop"], "pipeline.loop")
            steps = [Step(s.name, list(s.overrides), s.group, None, tuple(s.fixed), s.concurrent) for s in loop.steps()]
            return cls._checked(steps, node, loop)
        if not node or not node.get("steps"):
            raise ConfigError("pipeline.steps", "stage=pipeline needs a list of steps (see experiment=demo)")
        steps = []
        for i, item in enumerate(node["steps"]):
            if not isinstance(item, dict) or "name" not in item or "overrides" not in item:
                raise ConfigError(f"pipeline.steps[{i}]", "each step needs a name and a list of overrides")
            name, overrides = str(item["name"]), [str(o) for o in item["overrides"]]
            seeds = item.get("seeds")
            if seeds is None:
                steps.append(Step(name, overrides, name))
                continue
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
                raise ConfigError(f"pipeline.steps[{i}].seeds", f"must be a list of integer seeds, got {seeds!r}")
            steps += [Step(f"{name}_seed{seed}", overrides, name, seed) for seed in seeds]
        return cls._checked(steps, node, None)

    @classmethod
    def _checked(cls, steps: list[Step], node: Any, loop: Any) -> PipelineSpec:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ConfigError("pipeline.steps", f"step names must be unique, got {names}")
        extra = {str(k): [str(o) for o in v] for k, v in (node.get("extra") or {}).items()}
        unknown = sorted(set(extra) - {s.group for s in steps})
        if unknown:
            raise ConfigError(f"pipeline.extra.{unknown[0]}", f"no step of that name (steps: {', '.join(names)})")
        beside = [s.name for s in steps if s.runs_beside]
        for i, step in enumerate(steps):  # seeded steps may run at once: none may read another's directory
            used = [n for n in beside if "{" + n + "}" in " ".join(step.overrides)]
            if step.runs_beside and used:
                raise ConfigError(f"pipeline.steps.{step.group}", f"a seeded step cannot use the directory of "
                                                                  f"another seeded step ({{{used[0]}}})")
        parallel = node.get("parallel", 1)
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise ConfigError("pipeline.parallel", f"must be an integer >= 1, got {parallel!r}")
        return cls(steps, extra, parallel, loop)


def run_pipeline(cfg: DictConfig, run_dir: Path, task_overrides: list[str], choices: dict[str, Any],
                 config_name: str, run_step: StepRunner) -> float | None:
    """Run the steps in order, each in its own directory with `run_step`; skip the finished ones."""
    spec = PipelineSpec.from_config(OmegaConf.to_container(cfg.get("pipeline"), resolve=True) or {})
    first_launch = not (run_dir / RUN_RECORD).exists()
    write_record(run_dir, task_overrides, choices, cfg)
    try:
        return _run_steps(spec, cfg, run_dir, task_overrides, choices, config_name, run_step)
    except BaseException:
        # no step claimed its directory (the first one failed before training): neither does the pipeline
        if first_launch and not any((run_dir / s.name / RUN_RECORD).exists() for s in spec.steps):
            unclaim(run_dir)
        raise


def _run_steps(spec: PipelineSpec, cfg: DictConfig, run_dir: Path, task_overrides: list[str],
               choices: dict[str, Any], config_name: str, run_step: StepRunner) -> float | None:
    global_overrides = _global_overrides(task_overrides)
    # every step composes the same config groups as the pipeline: a group override given on the
    # command line applies to every step, or (no such node: hparams_search) to none
    groups = {key: _has(cfg, GROUP_NODES.get(key, key)) for key in choices}
    results: dict[str, dict[str, Any]] = {}
    value = None
    processes = StepProcesses(spec.parallel, entry_script()) if spec.parallel > 1 else None
    with forwarding_signals(processes, run_dir) if processes else contextlib.nullcontext():
        for step in spec.steps:
            step_dir = run_dir / step.name
            record = _read_json(step_dir / METRICS_FILE)
            if record.get("status") == "completed":
                log.info("pipeline step %s already finished: %s", step.name, step_dir)
                results[step.name] = record
                continue
            resuming = (step_dir / RUN_RECORD).exists()
            step_cfg, overrides, step_choices = compose_step(step, spec, run_dir, global_overrides, groups, config_name)
            if processes is not None and step.runs_beside:  # beside the other seeded steps
                processes.start(step.name, step_dir, overrides, resuming)
                continue
            if processes is not None:  # an unseeded step may read what the seeded ones before it wrote
                processes.wait_all()
            log.info("pipeline step %s%s: %s", step.name, " (resuming)" if resuming else "", " ".join(overrides))
            if resuming:
                OmegaConf.update(step_cfg, "resume", str(step_dir), merge=False)
            try:
                value = run_step(step_cfg, step_dir, overrides, step_choices, config_name)
            except RunInterrupted as interrupted:  # point at the pipeline, which resumes this step
                raise RunInterrupted(str(interrupted).replace(f"resume={step_dir}", f"resume={run_dir}"),
                                     interrupted.exit_code) from None
        if processes is not None:
            processes.wait_all()
    results = {step.name: results.get(step.name) or _read_json(run_dir / step.name / METRICS_FILE)
               for step in spec.steps}
    summary = summarise(results, seeded={step.name for step in spec.steps if step.seed is not None})
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1, ensure_ascii=False))
    for line in summary_table(summary):
        log.info(line)
    if any(step.seed is not None for step in spec.steps):
        for line in write_ranking(run_dir, spec.steps, results):
            log.info(line)
    if spec.loop is not None:
        for line in spec.loop.report(run_dir, results):
            log.info(line)
    log.info("outputs: %s (one directory per step; summary.json); tensorboard --logdir %s", run_dir, run_dir)
    return value


def _global_overrides(task_overrides: list[str]) -> list[str]:
    """Command-line overrides meant for every step (not the pipeline's own keys)."""
    own = ("stage", "experiment", "resume", "pipeline")
    return [o for o in task_overrides if override_key(o).split(".")[0] not in own]


def compose_step(step: Step, spec: PipelineSpec, run_dir: Path, global_overrides: list[str],
                 groups: dict[str, bool], config_name: str) -> tuple[DictConfig, list[str], dict[str, Any]]:
    """The step's config -- composed once -- with the overrides that make it and its group choices.

    The overrides, a later one winning: the step's own (`{name}` filled in), the global ones that
    apply to it, its extras, its directory. A global override applies where the step's config has
    its key. One that picks a config group (`trainer=cpu`) is composed with the step; one that sets
    a value (`seed=1`, `demo.annotator.length_bias=0.2`) is set on the composed config by Hydra's own
    rule, as composing with it would -- without composing twice to learn whether the key is there.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    directories = {s.name: str(run_dir / s.name) for s in spec.steps}
    own = [o.format(**directories) for o in step.overrides]
    extra = [o.format(**directories) for o in spec.extra.get(step.group or step.name, [])]
    if step.seed is not None:  # a seeded step's own seed wins over a seed= given to every step
        extra.append(f"seed={step.seed}")
    extra += [o.format(**directories) for o in step.fixed]
    extra.append(f"paths.output_dir={run_dir / step.name}")
    later = {override_key(o) for o in extra}
    # an extra replaces the step's own setting of the same key (a step's trainer.max_steps by a test's
    # 4): only the one that holds is composed and recorded, so a resume sees the same overrides
    own = [o for o in own if override_key(o) not in later]
    global_overrides = [o for o in global_overrides if override_key(o) not in later]  # the step sets these itself
    picks = [o for o in global_overrides if groups.get(override_key(o))]
    cfg, choices = compose_config(own + picks + extra, config_name)
    kept = []
    for text in global_overrides:
        key = override_key(text)
        if not (groups[key] if key in groups else _has(cfg, key)):
            log.info("pipeline step %s: override %s does not apply to it", step.name, text)
            continue
        if key not in groups:
            ConfigLoaderImpl._apply_overrides_to_config([OverridesParser.create().parse_override(text)], cfg)
        kept.append(text)
    return cfg, own + kept + extra, choices


def _has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# -- the summary ------------------------------------------------------------------------------------
HEADLINES = {
    "sft": ("val/loss", "val/perplexity"),
    "rm": ("val/accuracy", "val/gold_accuracy", "val/annotator_gold_agreement", "val/ece"),
    "ppo": ("eval/reward", "eval/kl", "eval/win_rate_vs_sft", "eval/length_mean"),
    "grpo": ("eval/reward", "eval/kl", "eval/win_rate_vs_sft", "eval/length_mean"),
    "rloo": ("eval/reward", "eval/kl", "eval/win_rate_vs_sft", "eval/length_mean"),
    "reward_weighted": ("eval/reward", "eval/kl", "eval/win_rate_vs_sft", "eval/length_mean"),
    "dpo": ("val/loss", "val/rewards/accuracies", "eval/kl", "eval/win_rate_vs_sft", "eval/length_mean"),
    "sample_pairs": ("pairs/selected", "pairs/score_mean", "pairs/gold_gap_mean"),
    "label": ("labels/total_pairs", "labels/gold_agreement"),
}


def summarise(results: dict[str, dict[str, Any]], seeded: set[str] = frozenset()) -> dict[str, Any]:
    """Each step's key metrics and wall time (over all its launches), the gold score along the way
    (not through the `seeded` steps: the ranking compares those); the pipeline's wall time is the sum
    of its steps', whichever launch ran them."""
    steps = {}
    gold: dict[str, float] = {}
    for name, record in results.items():
        metrics = record.get("metrics", {})
        stage = record.get("stage", name)
        keys = HEADLINES.get(stage, ())
        steps[name] = {"stage": stage, "wall_time_s": record.get("wall_time_s"),
                       "global_step": record.get("global_step"),
                       "metrics": {k: metrics[k] for k in keys if k in metrics}}
        if name in seeded:
            continue
        # the hidden gold score along the pipeline: untrained base -> SFT -> PPO (or GRPO, RLOO)
        if stage == "sft" and "eval/gold_score" in metrics:
            gold.setdefault("untrained", metrics.get("eval/gold_score_initial"))
            gold["sft"] = metrics["eval/gold_score"]
            gold["sft_std"] = metrics.get("eval/gold_score_std")
        if stage in FROM_SFT and "eval/gold_score" in metrics:
            # a stage from SFT measures its start (the SFT policy) and its end on the same prompts and seed
            gold[f"{stage}_start"] = metrics.get("eval/gold_score_initial")
            gold[f"{stage}_start_std"] = metrics.get("eval/gold_score_std_initial")
            gold[stage] = metrics["eval/gold_score"]
    wall_time_s = sum(step["wall_time_s"] for step in steps.values() if step["wall_time_s"] is not None)
    summary: dict[str, Any] = {"wall_time_s": round(wall_time_s, 1), "steps": steps}
    if gold:
        summary["gold_score"] = {k: v for k, v in gold.items() if v is not None}
        for stage in FROM_SFT:
            if gold.get(f"{stage}_start") is not None and gold.get(f"{stage}_start_std"):
                summary["gold_score"][f"{stage}_gain_in_sft_std"] = (
                    (gold[stage] - gold[f"{stage}_start"]) / gold[f"{stage}_start_std"])
    return summary


def summary_table(summary: dict[str, Any]) -> list[str]:
    lines = ["", "| step | stage | wall time | key metrics |", "|---|---|---|---|"]
    for name, step in summary["steps"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in step["metrics"].items())
        wall = f"{step['wall_time_s']:.0f} s" if step.get("wall_time_s") is not None else "-"
        lines.append(f"| {name} | {step['stage']} | {wall} | {shown} |")
    gold = summary.get("gold_score")
    if gold:
        parts = [f"{k} {gold[k]:.3f}" for k in ("untrained", "sft") + FROM_SFT if k in gold]
        lines.append(f"hidden gold score: {' -> '.join(parts)}")
        for stage in FROM_SFT:
            if f"{stage}_gain_in_sft_std" in gold:
                lines.append(f"  {stage.upper()} vs its SFT start on the same held-out prompts: "
                             f"{gold[f'{stage}_start']:.3f} -> {gold[stage]:.3f} "
                             f"({gold[f'{stage}_gain_in_sft_std']:+.2f} standard deviations of the SFT policy)")
    lines.append(f"total wall time: {summary['wall_time_s']:.0f} s")
    return lines
