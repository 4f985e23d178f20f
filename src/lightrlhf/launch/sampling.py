"""Running a stage that trains nothing (`SamplingStage`: best-of-n).

    build (as any stage) -> record the run (run.json, config.yaml) -> stage.run(run_dir)
    -> metrics.json (atomically, the same status/optimized_* keys as a trained run) -> the metric

There is no trainer, checkpoint or export, so `resume=` and `ckpt_path=` have nothing to continue
from: they are refused in one line -- unless the stage is `resumable` (sample_pairs, label): it
then runs again in its directory and continues from the files it left there (a pipeline resumes
such a step the same way). A run that fails leaves its directory unclaimed (reusable).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightrlhf.errors import ConfigError
from lightrlhf.io import atomic_write_text
from lightrlhf.launch import record, report

log = logging.getLogger("lightrlhf")


def is_sampling_stage(stage: Any) -> bool:
    from lightrlhf.stages.base import SamplingStage

    return isinstance(stage, SamplingStage)


def run_sampling(stage: Any, optimized_metric: str | None, cfg: DictConfig, run_dir: Path, overrides: list[str],
                 choices: dict[str, Any], started: float, resuming: bool) -> float | None:
    name = choices.get("stage")
    if resuming and not getattr(stage, "resumable", False):
        raise ConfigError("resume", f"stage={name} trains nothing, so there is no checkpoint to continue from; "
                                    "run it again (resume= and ckpt_path= apply to training stages)")
    record.write_record(run_dir, overrides, choices, cfg)
    try:
        result = stage.run(run_dir)
    except BaseException:
        record.unclaim(run_dir)
        raise
    metrics = result["metrics"]
    metric, value, mode = report.optimized(optimized_metric, stage.default_metric, metrics)
    summary = {"status": "completed", "stage": name, "wall_time_s": round(time.perf_counter() - started, 2),
               "optimized_metric": metric, "optimized_value": value, "optimized_mode": mode, **result}
    atomic_write_text(run_dir / report.METRICS_FILE, json.dumps(summary, indent=1, ensure_ascii=False))
    log.info("%s finished in %.1f s; outputs: %s (metrics.json)", name, summary["wall_time_s"], run_dir)
    return value
