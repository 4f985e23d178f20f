"""The data report: what a data set holds, before a model is trained on it.

    python -m lightrlhf.data report data=<data> [model=<model>] [report.split=validation]

reads the split through the same loader, format detection and cleaning (`data.clean`) as a stage,
streams it through `DataProfile` (`report.workers` processes tokenize and count while this one reads
and cleans), and writes `report.json` and PNG plots (`lightrlhf.data.plots`)
into the run directory. Token counts are in the tokens of `model`'s tokenizer, the ones a stage
trains on. Stages log the same figures (`summary_scalars`) at their start as `data/*`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lightrlhf.data.formats import detect_kind, stream_examples
from lightrlhf.data.profile import DataProfile
from lightrlhf.data.source import DataSource
from lightrlhf.data.tokenize import token_counter, token_ids
from lightrlhf.errors import UserError
from lightrlhf.io import atomic_write_text
from lightrlhf.validation import in_range, non_negative, one_of

log = logging.getLogger("lightrlhf")
KINDS = ("auto", "preference", "sft", "prompt")


@dataclass(frozen=True)
class ReportSpec:
    """The `report` node of conf/report.yaml."""

    split: str = "train"
    kind: str = "auto"
    top_prompts: int = 10
    length_bias_warning: float = 0.6
    plots: bool = True
    # processes that tokenize and count beside the one that reads and cleans; 0 = a thread. 0 here because a
    # process that already runs threads (a test runner, a notebook with torch loaded) can deadlock forking
    # them; the command (conf/report.yaml) forks 2 from its fresh process
    workers: int = 0


    def __post_init__(self) -> None:
        one_of("split", self.split, ["train", "validation"])
        one_of("kind", self.kind, KINDS)
        non_negative("top_prompts", self.top_prompts)
        non_negative("workers", self.workers)
        in_range("length_bias_warning", self.length_bias_warning, 0.5, 1.0)


def build_report(source: DataSource, tokenizer, spec: ReportSpec) -> dict[str, Any]:
    """The report of one split of `source` (see the module docstring), as a JSON-ready dict."""
    started = time.perf_counter()
    path, split = (source.path, source.split) if spec.split == "train" else (source.validation_path, source.validation_split)
    if path is None:
        raise UserError("config report.split: validation, but data.validation_path is null (the held-out rows "
                        "are taken from the training file: report the train split)")
    kind = spec.kind if spec.kind != "auto" else detect_kind(path, split, source.max_line_bytes)
    examples, load_report = stream_examples(
        kind, path, format=source.format, split=split, strict=source.strict, clean=source.clean,
        margin_from_scores=source.margin_from_scores and kind == "preference", max_line_bytes=source.max_line_bytes,
        count_tokens=token_counter(tokenizer), measure_all=True)
    profile = DataProfile(kind, partial(token_ids, tokenizer), spec.top_prompts, spec.length_bias_warning)
    profile.add_all(examples, workers=spec.workers)
    result = profile.result(load_report)
    result["split"] = spec.split
    result["cleaning"] = asdict(source.clean)
    result["tokenizer"] = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    return result


def write_report(result: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """report.json and (plots=True) the PNGs in `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    written = [out_dir / "report.json"]
    if plots:
        from lightrlhf.data.plots import write_plots

        written += write_plots(result, out_dir)
    return written


def log_report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    dropped = ", ".join(f"{k}: {v}" for k, v in rows["dropped"].items()) or "none"
    log.info("%s (%s, %s): %d rows read, %d kept (dropped: %s)", result["source"], result["kind"], result["format"],
             rows["read"], rows["kept"], dropped)
    bias = result.get("length_bias")
    if bias:
        log.info("length bias: chosen longer in %.1f%% of %d pairs; a length-only classifier gets %.1f%%",
                 100 * bias["chosen_longer_fraction"], bias["pairs"], 100 * bias["length_only_accuracy"])
    for warning in result["warnings"]:
        log.warning("warning: %s", warning)
