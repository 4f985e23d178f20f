"""Hydra callbacks: check the output directory before a run, summarise a sweep after it.

`CheckOutputDirectory`: Hydra creates the run (or sweep) directory and its `train.log` before any of
our code runs; a path that cannot be written would end in a traceback from inside Hydra, and
`resume=<dir>` (the run directory) would create `<dir>` or write into a directory that holds no run.
Checked first, each is one line and exit status 2, with nothing created or written.

`SweepSummary`: after a sweep (`python train.py -m ...`, grid or Optuna), one table of overrides -> metric.

Each run of a sweep writes `metrics.json` (with the optimised metric, its value and direction,
or `status: failed` and the error) into its own directory. This Hydra callback reads them when
the sweep ends and writes `sweep_summary.md` and `sweep_summary.json` into the sweep directory:
every run's overrides, its metric, the failed runs with their one-line errors, and the best run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightrlhf.errors import UserError
from lightrlhf.io import atomic_write_text, ensure_writable_dir
from lightrlhf.launch.cli import exit_for_user_error
from lightrlhf.launch.record import check_resumable

log = logging.getLogger("lightrlhf")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: _job_number(p.parent.name)):
        record = json.loads(metrics_file.read_text(encoding="utf-8"))
        run_file = metrics_file.parent / "run.json"
        overrides = json.loads(run_file.read_text(encoding="utf-8")).get("overrides", []) if run_file.exists() else []
        runs.append({"dir": str(metrics_file.parent), "overrides": overrides, "status": record.get("status"),
                     "metric": record.get("optimized_metric"), "value": record.get("optimized_value"),
                     "mode": record.get("optimized_mode", "max"), "error": record.get("error")})
    return runs


def _job_number(name: str) -> float:
    return int(name) if name.isdigit() else math.inf


def best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in runs if r["status"] == "completed" and isinstance(r["value"], (int, float))
              and not math.isnan(r["value"])]
    if not scored:
        return None
    sign = -1.0 if scored[0]["mode"] == "min" else 1.0
    return max(scored, key=lambda r: sign * r["value"])


def markdown(runs: list[dict[str, Any]], winner: dict[str, Any] | None) -> str:
    fixed = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    metric = next((r["metric"] for r in runs if r["metric"]), "metric")
    lines = [f"| run | overrides | {metric} | status |", "|---|---|---|---|"]
    for r in runs:
        varying = " ".join(o for o in r["overrides"] if o not in fixed) or "(none)"
        value = f"{r['value']:.4f}" if isinstance(r["value"], (int, float)) and not math.isnan(r["value"]) else "-"
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        mark = " **best**" if r is winner else ""
        lines.append(f"| {Path(r['dir']).name}{mark} | {varying} | {value} | {status} |")
    if fixed:
        lines.append("")
        lines.append("common overrides: " + " ".join(sorted(fixed)))
    return "\n".join(lines)


class CheckOutputDirectory(Callback):
    # detail: Hydra turns an exception from a callback into a warning and carries on, so the
    # one-line exit (a SystemExit) is raised here directly.
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        resume = config.get("resume")
        if resume:
            try:
                check_resumable(str(resume))
            except UserError as error:
                exit_for_user_error(error)
        _check(config.hydra.run.dir, "run directory")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config.hydra.sweep.dir, "sweep directory")


def _check(path: str, what: str) -> None:
    try:
        ensure_writable_dir(path, what)
    except UserError as error:
        exit_for_user_error(error)


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml) writing the sweep's summary when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect(sweep_dir)
        if not runs:
            return
        winner = best(runs)
        text = markdown(runs, winner)
        atomic_write_text(sweep_dir / "sweep_summary.md", text + "\n")
        atomic_write_text(sweep_dir / "sweep_summary.json", json.dumps({"runs": runs, "best": winner}, indent=1, ensure_ascii=False))
        failed = sum(r["status"] != "completed" for r in runs)
        log.info("sweep of %d runs (%d failed); summary: %s\n%s", len(runs), failed,
                 sweep_dir / "sweep_summary.md", text)
