"""`run(cfg)`: what `python train.py` does with a composed config.

    compose (Hydra; record.py for resume) -> build the parts (parts.py) -> fit (Lightning)
    -> export -> metrics.json (report.py) -> the metric, returned to Hydra's sweepers

`stage=pipeline` runs several of these, one per step (pipeline.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightrlhf import threads
from lightrlhf.errors import ConfigError, UserError
from lightrlhf.io import ensure_writable_dir
from lightrlhf.launch import record, report
from lightrlhf.launch.build import build
from lightrlhf.launch.cli import exit_for_user_error
from lightrlhf.launch.parts import ClaimRunDirectory, build_stage, build_trainer
from lightrlhf.launch.pipeline import run_pipeline
from lightrlhf.launch.relaunch import is_rank_zero, rank_relaunch_command
from lightrlhf.launch.sampling import is_sampling_stage, run_sampling
from lightrlhf.validation import positive

log = logging.getLogger("lightrlhf")
TOP_LEVEL_PARTS = ("stage", "model", "data", "trainer", "logger", "callbacks", "paths", "demo", "hydra",
                   "policy", "value", "reward", "pipeline", "numerics", "env")


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


def run(cfg: DictConfig) -> float | None:
    """Entry for `train.py`: returns the metric to optimise (NaN for a failed run in a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return run_stage(cfg, run_dir, list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices),
                         hydra_cfg.job.config_name)
    except Exception as error:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return report.failed(run_dir, error)  # one failed run must not end a sweep
        if isinstance(error, UserError):
            exit_for_user_error(error)
        raise


def run_stage(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict[str, Any],
              config_name: str = "train") -> float | None:
    """Train one stage in `run_dir` (or the steps of `stage=pipeline`); returns the optimised metric."""
    started = time.perf_counter()
    ensure_writable_dir(run_dir, "run directory")
    # step 1. the config: as given for a new run, the recorded one with the given overrides on resume
    cfg, overrides, choices = record.this_run(cfg, run_dir, overrides, choices, config_name)
    if choices.get("stage") == "pipeline":
        return run_pipeline(cfg, run_dir, overrides, choices, config_name, run_step=run_stage)
    plain = to_plain(cfg)
    settings = _settings(plain)
    adaptive_threads = threads.configure(settings.threads)  # README, "Threads"

    import lightning as L

    L.seed_everything(settings.seed, workers=True, verbose=False)
    # step 2. build: everything that can be wrong with the config or the data is found here, before
    # any training starts. The run claims its directory (run.json) only when its first batch starts.
    stage, datamodule = build_stage(plain)
    if is_sampling_stage(stage):  # trains nothing: no trainer, no checkpoints, no export
        return run_sampling(stage, settings.optimized_metric, cfg, run_dir, overrides, choices, started,
                            resuming=bool(settings.resume or settings.ckpt_path))
    start = record.start_point(run_dir, bool(settings.resume), settings.ckpt_path)
    claim = ClaimRunDirectory(lambda: record.write_record(run_dir, overrides, choices, cfg) if is_rank_zero() else None)
    trainer = build_trainer(plain, start, started, [claim, adaptive_threads])
    log.info("run directory: %s", run_dir)
    # step 3. fit
    ckpt_path = str(start.checkpoint) if start.checkpoint else None
    with record.unclaimed_on_failure(run_dir, trainer.loggers), \
            rank_relaunch_command(run_dir, overrides, resuming=bool(settings.resume)):
        trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    for callback in trainer.callbacks:  # SIGINT/SIGTERM: the checkpoint callback says what it saved
        interrupted = getattr(callback, "interruption", lambda _: None)(run_dir)
        if interrupted is not None:
            raise interrupted
    if trainer.interrupted:
        raise KeyboardInterrupt
    claim.claim()  # a fit with no batch left to train (its checkpoint already at the budget)
    # step 4. the final metrics describe the final weights, whatever val_check_interval was
    training_metrics = report.collect_metrics(trainer, stage)
    if stage.last_validated_step != trainer.global_step:
        trainer.validate(stage, datamodule=datamodule, verbose=False)
    metrics = {**training_metrics, **report.collect_metrics(trainer, stage)}  # validate() resets the logged ones
    name, value, mode = report.optimized(settings.optimized_metric, stage.default_metric, metrics)
    # step 5. export, then report
    if settings.export.enabled and trainer.is_global_zero:
        exported_config = {k: v for k, v in plain.items() if k != "hydra"}
        stage.export(run_dir / "export", config=exported_config, metrics=metrics, merged=settings.export.merged)
    if trainer.is_global_zero:
        summary = {"status": "completed", "stage": choices.get("stage"), "global_step": trainer.global_step,
                   "wall_time_s": round(start.elapsed_s + time.perf_counter() - started, 2), "optimized_metric": name,
                   "optimized_value": value, "optimized_mode": mode, "metrics": metrics,
                   "data": dict(getattr(datamodule, "summary", {}))}
        report.publish(summary, run_dir, trainer, stage.default_metric, overrides)
    return value
