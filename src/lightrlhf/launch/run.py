"""`run(cfg)`: what `python train.py` does with a composed config.

    compose (Hydra) -> check and build the parts -> fit (Lightning) -> export -> metrics.json -> metric

A run directory holds exactly one run. `resume=<dir>` re-composes the config from the overrides
that run was launched with (recorded in `run.json`) plus the ones given now -- so
`python train.py resume=<dir> trainer.max_steps=400` is enough -- and continues from the newest
complete checkpoint in `<dir>/checkpoints`, writing into the same TensorBoard run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightrlhf.callbacks.checkpoint import AtomicCheckpointIO, checkpoint_files, latest_checkpoint, logging_step_of
from lightrlhf.errors import ConfigError, UserError
from lightrlhf.io import atomic_write_text, ensure_writable_dir
from lightrlhf.launch.build import build
from lightrlhf.launch.cli import exit_for_user_error
from lightrlhf.validation import positive

log = logging.getLogger("lightrlhf")
RUN_RECORD = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
# Config groups that define what a run *is*; a resumed run may not switch them.
IDENTITY_GROUPS = ("stage", "model", "data")
TOP_LEVEL_PARTS = ("stage", "model", "data", "trainer", "logger", "callbacks", "paths", "demo", "hydra",
                   "policy", "value", "reward", "pipeline", "numerics")
# Top-level role blocks a stage may use (PPO: policy.init, value.init, reward.path ...); each is
# built from its own key so errors name it, and handed to the stage's model factory and the stage.
ROLE_BLOCKS = ("policy", "value", "reward", "numerics")


@dataclass(frozen=True)
class ExportSettings:
    enabled: bool = True
    merged: bool = False  # also write the adapter folded into full weights (export/merged/)


@dataclass(frozen=True)
class RunSettings:
    """Top-level keys of `conf/train.yaml` (everything that is not a config group)."""

    seed: int = 0
    resume: str | None = None
    ckpt_path: str | None = None
    optimized_metric: str | None = None
    threads: int | None = None
    export: ExportSettings = field(default_factory=ExportSettings)

    def __post_init__(self) -> None:
        if self.threads is not None:
            positive("threads", self.threads)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolve every interpolation; a bad one is a config error naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", "") or ""
        message = str(error).splitlines()[0]
        raise ConfigError(str(key), message) from None


def _settings(plain: dict[str, Any]) -> RunSettings:
    top = {k: v for k, v in plain.items() if k not in TOP_LEVEL_PARTS}
    return build({"_target_": f"{__name__}.RunSettings", **top}, "")


def _is_rank_zero() -> bool:
    # Lightning's DDP launcher re-runs this script once per extra rank with these variables set.
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


# -- run directory bookkeeping ---------------------------------------------------------------------
def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_RECORD
    if not path.is_file():
        raise UserError(f"resume={run_dir}: no run to resume there (no {RUN_RECORD}; "
                        "is it the directory of a lightrlhf run?)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path}: unreadable run record ({error})") from None


def refuse_existing_run(run_dir: Path) -> None:
    if (run_dir / RUN_RECORD).exists() or checkpoint_files(run_dir / "checkpoints"):
        raise UserError(f"{run_dir} already holds a run; continue it with resume={run_dir}, "
                        "or choose a new hydra.run.dir")


def override_key(text: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text).key_or_group


def identity_change(current: list[str], choices: dict[str, Any]) -> str | None:
    """The first group of IDENTITY_GROUPS that an override in `current` switches away from `choices`."""
    for text in current:
        key = override_key(text)
        if key in IDENTITY_GROUPS and "=" in text and text.split("=", 1)[1] != str(choices.get(key)):
            return key
    return None


def merged_overrides(previous: list[str], current: list[str], choices: dict[str, Any]) -> list[str]:
    """The recorded overrides with the current ones applied on top (last one per key wins)."""
    current = [o for o in current if override_key(o) != "resume"]
    key = identity_change(current, choices)
    if key is not None:
        raise UserError(f"resume: cannot change {key} of an existing run "
                        f"(it was {key}={choices.get(key)}); start a new run instead")
    by_key: dict[str, str] = {}
    for text in previous + current:
        by_key.pop(override_key(text), None)
        by_key[override_key(text)] = text
    return list(by_key.values())


def recompose_for_resume(run_dir: Path, current: list[str],
                         config_name: str) -> tuple[DictConfig, list[str], dict[str, Any]]:
    """The resumed run's config, overrides and config-group choices (recorded + current overrides)."""
    from hydra import compose
    from omegaconf import open_dict

    record = read_record(run_dir)
    overrides = merged_overrides(record.get("overrides", []), current, record.get("choices", {}))
    cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, overrides, choices


def write_record(run_dir: Path, overrides: list[str], choices: dict[str, Any], cfg: DictConfig) -> None:
    record = {"overrides": [o for o in overrides if override_key(o) != "resume"],
              "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")}}
    previous = run_dir / RUN_RECORD
    if previous.exists():
        record["launches"] = json.loads(previous.read_text()).get("launches", 1) + 1
    else:
        record["launches"] = 1
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    atomic_write_text(previous, json.dumps(record, indent=1))


# -- the run ---------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> float | None:
    """Entry for `train.py`: returns the metric to optimise (NaN for a failed run in a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return run_in(cfg, run_dir, list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices),
                      hydra_cfg.job.config_name)
    except Exception as error:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(error, UserError):
                exit_for_user_error(error)
            raise
        # One failed run must not end a sweep: record why, report NaN (Optuna marks it failed).
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        log.error("run failed: %s", message, exc_info=not isinstance(error, UserError))
        atomic_write_text(run_dir / METRICS_FILE, json.dumps({"status": "failed", "error": message.splitlines()[0]
                                                              if message else type(error).__name__}, indent=1))
        return float("nan")


def run_in(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict[str, Any],
           config_name: str = "train") -> float | None:
    started = time.perf_counter()
    ensure_writable_dir(run_dir, "run directory")
    resume = cfg.get("resume")
    if resume:
        if Path(str(resume)).expanduser().resolve() != run_dir.resolve():
            raise UserError(f"resume={resume} but the run directory is {run_dir}; "
                            "leave hydra.run.dir unset when resuming")
        cfg, overrides, choices = recompose_for_resume(run_dir, overrides, config_name)
        OmegaConf.update(cfg, "resume", str(run_dir), merge=False)
    elif _is_rank_zero():
        refuse_existing_run(run_dir)
    if choices.get("stage") == "pipeline":
        from lightrlhf.launch.pipeline import PipelineSpec, run_pipeline

        spec = PipelineSpec.from_config(OmegaConf.to_container(cfg.get("pipeline"), resolve=True) or {})
        write_record(run_dir, overrides, choices, cfg)
        return run_pipeline(spec, run_dir, overrides, config_name)
    plain = to_plain(cfg)
    settings = _settings(plain)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    import lightning as L

    L.seed_everything(settings.seed, workers=True, verbose=False)
    ckpt_path = _checkpoint_to_load(settings, run_dir)
    # Everything that can be wrong with the config or the data is found here, before the run
    # directory is claimed (run.json) and before any training starts.
    stage, datamodule = build_stage(plain)
    trainer = build_trainer(plain, ckpt_path)
    if _is_rank_zero():
        write_record(run_dir, overrides, choices, cfg)
    log.info("run directory: %s", run_dir)
    with rank_relaunch_command(run_dir, overrides, resuming=bool(settings.resume)):
        trainer.fit(stage, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    for callback in trainer.callbacks:
        interrupted = getattr(callback, "interruption", lambda _: None)(run_dir)
        if interrupted is not None:
            raise interrupted
    if trainer.interrupted:
        raise KeyboardInterrupt
    training_metrics = collect_metrics(trainer, stage)
    if getattr(stage, "last_validated_step", trainer.global_step) != trainer.global_step:
        # the final metrics describe the final weights, whatever val_check_interval was
        trainer.validate(stage, datamodule=datamodule, verbose=False)
    metrics = {**training_metrics, **collect_metrics(trainer, stage)}  # validate() resets the logged metrics
    name, value, mode = optimized(settings, stage, metrics)
    if settings.export.enabled and trainer.is_global_zero:
        stage.export(run_dir / "export", config=_exported_config(plain), metrics=metrics, merged=settings.export.merged)
    if trainer.is_global_zero:
        record = {"status": "completed", "stage": choices.get("stage"), "global_step": trainer.global_step,
                  "wall_time_s": round(time.perf_counter() - started, 2), "optimized_metric": name,
                  "optimized_value": value, "optimized_mode": mode, "metrics": metrics,
                  "data": dict(getattr(datamodule, "summary", {}))}
        atomic_write_text(run_dir / METRICS_FILE, json.dumps(record, indent=1))
        log_hparams(trainer, record, overrides)
        for line in summary_lines(record, stage, run_dir):
            log.info(line)
    return value


@contextlib.contextmanager
def rank_relaunch_command(run_dir: Path, overrides: list[str], resuming: bool) -> Iterator[None]:
    """Make the command Lightning's DDP launcher re-runs for each extra rank *this* single run.

    Lightning starts ranks 1..N-1 by re-running `sys.argv` with `hydra.run.dir=<HydraConfig run.dir>`.
    Inside a `-m` sweep that command is the whole sweep (each rank would start a sweep of its own)
    and the run.dir pattern names a new timestamped directory; inside a pipeline it is the whole
    pipeline. Here the command becomes this run's own overrides (resuming if this run resumes) and
    the run directory this run writes to, so every rank joins the same run in the same directory.

    Afterwards the process group is closed and the environment variables the launcher set are
    restored, so the next run of a sweep in this process starts its own ranks again.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    saved_argv, saved_environ = list(sys.argv), dict(os.environ)
    sys.argv = [saved_argv[0]] + list(overrides) + ([f"resume={run_dir}"] if resuming else [])
    hydra_cfg = HydraConfig.instance().cfg
    saved_dir = None
    run_node = hydra_cfg.hydra.run if hydra_cfg is not None else None
    if run_node is not None:
        with read_write(run_node), open_dict(run_node):
            saved_dir = run_node.dir
            run_node.dir = str(run_dir)
    try:
        yield
    finally:
        sys.argv = saved_argv
        if _is_rank_zero() and "LOCAL_RANK" not in saved_environ:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(saved_environ)
        if run_node is not None:
            with read_write(run_node), open_dict(run_node):
                run_node.dir = saved_dir


def _checkpoint_to_load(settings: RunSettings, run_dir: Path) -> Path | None:
    if settings.resume:
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            log.warning("resume: no checkpoint in %s yet; starting this run from the beginning", run_dir)
        return found
    if settings.ckpt_path:
        path = Path(settings.ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError("ckpt_path", f"{path} is not a checkpoint file")
        return path
    return None


def build_stage(plain: dict[str, Any]):
    """(stage LightningModule, its datamodule) from the `stage` and `data` nodes."""
    from lightrlhf.models.loading import load_tokenizer

    stage_node = dict(plain["stage"])
    # detail: `model` and `data` are built from their own top-level nodes, so an error names the
    # key the user typed (`model.lora.r`), not the place the stage refers to it from.
    spec = build(plain["model"], "model")
    tokenizer = load_tokenizer(spec)
    source = build(plain["data"], "data")
    datamodule = build(stage_node.pop("datamodule"), "stage.datamodule", source=source, tokenizer=tokenizer)
    datamodule.setup("fit")  # data errors surface before a large model is loaded
    roles = {k: build(plain[k], k) for k in ROLE_BLOCKS if plain.get(k) is not None}
    model_node = stage_node.pop("model")
    model = build(model_node, "stage.model", spec=spec, tokenizer=tokenizer,
                  **_accepted(model_node, roles, "stage.model"))
    stage = build(stage_node, "stage", model=model, datamodule=datamodule,
                  **_accepted(stage_node, roles, "stage"))
    return stage, datamodule


def _accepted(node: dict[str, Any], roles: dict[str, Any], key: str) -> dict[str, Any]:
    """The role blocks that the node's target takes as parameters."""
    import inspect

    from lightrlhf.launch.build import locate

    target = locate(str(node["_target_"]), key)
    params = inspect.signature(target).parameters
    return {k: v for k, v in roles.items() if k in params}


def build_trainer(plain: dict[str, Any], ckpt_path: Path | None):
    callbacks = [build(node, f"callbacks.{name}") for name, node in (plain.get("callbacks") or {}).items() if node]
    loggers = []
    for name, node in (plain.get("logger") or {}).items():
        if not node:
            continue
        extra = {}
        if ckpt_path is not None and str(node.get("_target_", "")).endswith("TensorBoardLogger"):
            # detail: events written after the checkpoint by the killed run are hidden, so the
            # resumed curve continues without a second copy of those steps.
            # mmap: only the bookkeeping is read here; Lightning reads the tensors when it restores
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            extra["purge_step"] = logging_step_of(checkpoint)
        loggers.append(build(node, f"logger.{name}", **extra))
    trainer_node = dict(plain["trainer"])
    plugins = list(trainer_node.pop("plugins", None) or []) + [AtomicCheckpointIO()]
    return build(trainer_node, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins)


def collect_metrics(trainer, stage) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(stage.final_metrics())
    return dict(sorted(metrics.items()))


def summary_lines(record: dict[str, Any], stage, run_dir: Path) -> list[str]:
    """What a researcher wants at the end of a run: the headline metrics and where things are."""
    metrics = record["metrics"]
    lines = [f"{record['stage']} finished: {record['global_step']} optimizer steps in {record['wall_time_s']:.1f} s"]
    for name in sorted(k for k in metrics if k.endswith("_initial") and not k.endswith("_std_initial")):
        final = name[: -len("_initial")]
        if final in metrics:
            lines.append(f"  {final}: {metrics[name]:.3f} at start -> {metrics[final]:.3f} "
                         f"({metrics[final] - metrics[name]:+.3f})")
    headline = getattr(stage, "default_metric", None)
    if headline in metrics:
        lines.append(f"  {headline}: {metrics[headline]:.4f}")
    lines.append(f"  outputs: {run_dir} (export/, metrics.json, checkpoints/); "
                 f"tensorboard --logdir {run_dir}")
    return lines


def _exported_config(plain: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plain.items() if k != "hydra"}


_LOWER_IS_BETTER = ("loss", "perplexity", "ece", "kl")


def optimized(settings: RunSettings, stage, metrics: dict[str, float]) -> tuple[str | None, float | None, str]:
    """(name, value, "min" or "max") of the metric handed to Hydra sweepers."""
    name = settings.optimized_metric or getattr(stage, "default_metric", None)
    if name is None:
        return None, None, "max"
    if name not in metrics:
        if settings.optimized_metric is None:  # the stage's own metric, absent when validation is off
            log.warning("no %s to report (validation did not run); the run returns no metric", name)
            return None, None, "max"
        raise ConfigError("optimized_metric", f"{name!r} is not among the run's metrics ({', '.join(metrics)})")
    mode = "min" if any(word in name.split("/")[-1] for word in _LOWER_IS_BETTER) else "max"
    return name, metrics[name], mode


def log_hparams(trainer, record: dict[str, Any], overrides: list[str]) -> None:
    """TensorBoard's HParams view: this run's overrides as hyperparameters, its headline metrics."""
    from lightning.pytorch.loggers import TensorBoardLogger

    params = {}
    for text in overrides:
        key, _, value = text.lstrip("+~").partition("=")
        if key and not key.startswith(("hydra", "paths", "resume")):
            params[key] = value
    metrics = {"hp/" + record["optimized_metric"].replace("/", "_"): record["optimized_value"]} \
        if record.get("optimized_metric") else {}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and params:
            logger.log_hyperparams(params, metrics)
            logger.experiment.flush()
