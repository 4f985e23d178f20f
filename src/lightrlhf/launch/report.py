"""What a run reports when it ends: `metrics.json`, the summary lines, TensorBoard's HParams view,
and the metric handed back to a Hydra sweeper.

`metrics.json` is `status: completed` with the run's metrics and the optimised metric (its name,
value and direction), or -- for a run of a sweep that failed -- `status: failed` and the one-line
error; `hydra_hooks.SweepSummary` reads them when the sweep ends.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightrlhf.errors import ConfigError, UserError
from lightrlhf.io import atomic_write_text

log = logging.getLogger("lightrlhf")
METRICS_FILE = "metrics.json"
_LOWER_IS_BETTER = ("loss", "perplexity", "ece", "kl")


def collect_metrics(trainer, stage) -> dict[str, float]:
    """The scalars Lightning holds from the last logging, and the stage's own final metrics."""
    import torch

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(stage.final_metrics())
    return dict(sorted(metrics.items()))


def optimized(requested: str | None, default: str | None,
              metrics: dict[str, float]) -> tuple[str | None, float | None, str]:
    """(name, value, "min" or "max") of the metric handed to Hydra sweepers: `optimized_metric` if
    set (`requested`), else the stage's `default_metric`."""
    name = requested or default
    if name is None:
        return None, None, "max"
    if name not in metrics:
        if requested is None:  # the stage's own metric, absent when validation is off
            log.warning("no %s to report (validation did not run); the run returns no metric", name)
            return None, None, "max"
        raise ConfigError("optimized_metric", f"{name!r} is not among the run's metrics ({', '.join(metrics)})")
    mode = "min" if any(word in name.split("/")[-1] for word in _LOWER_IS_BETTER) else "max"
    return name, metrics[name], mode


def publish(record: dict[str, Any], run_dir: Path, trainer, headline: str | None, overrides: list[str]) -> None:
    """Write `metrics.json`, give TensorBoard the run's hyperparameters, log the summary."""
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(record, indent=1, ensure_ascii=False))
    log_hparams(trainer, record, overrides)
    for line in summary_lines(record, headline, run_dir):
        log.info(line)


def failed(run_dir: Path, error: Exception) -> float:
    """A run of a sweep failed: record why in its `metrics.json`; NaN for the sweeper (Optuna marks
    the trial failed), so one failed run does not end the sweep."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    log.error("run failed: %s", message, exc_info=not isinstance(error, UserError))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps({"status": "failed", "error": message.splitlines()[0]
                                                          if message else type(error).__name__}, indent=1, ensure_ascii=False))
    return float("nan")


def summary_lines(record: dict[str, Any], headline: str | None, run_dir: Path) -> list[str]:
    """What a researcher wants at the end of a run: the headline metrics and where things are."""
    metrics = record["metrics"]
    lines = [f"{record['stage']} finished: {record['global_step']} optimizer steps in {record['wall_time_s']:.1f} s"]
    for name in sorted(k for k in metrics if k.endswith("_initial") and not k.endswith("_std_initial")):
        final = name[: -len("_initial")]
        if final in metrics:
            lines.append(f"  {final}: {metrics[name]:.3f} at start -> {metrics[final]:.3f} "
                         f"({metrics[final] - metrics[name]:+.3f})")
    if headline in metrics:
        lines.append(f"  {headline}: {metrics[headline]:.4f}")
    lines.append(f"  outputs: {run_dir} (export/, metrics.json, checkpoints/); "
                 f"tensorboard --logdir {run_dir}")
    return lines


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
