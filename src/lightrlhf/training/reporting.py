"""Small helpers for what stages show a researcher: text tables and the data summary."""

from __future__ import annotations

from typing import Any


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A TensorBoard text table (markdown); pipes and newlines in cells are escaped."""

    def cell(value: object) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def writes_step_metrics(trainer: Any) -> bool:
    """Whether Lightning writes this training batch's on-step metrics (every `log_every_n_steps`).

    Why ask: every `self.log` call costs Lightning ~2 ms of bookkeeping whether or not the value is
    written, and a reward-model step on the demo's model is ~100 ms; logging a dozen diagnostics on
    every batch to write one batch in ten spent a fifth of the stage's time. Batch diagnostics are
    computed and logged only on the batches that are written (the loss, shown in the progress bar,
    on every batch). Outside a fit (a stage driven by hand in a test) every batch is written."""
    connector = getattr(trainer, "_logger_connector", None) if trainer is not None else None
    return True if connector is None else bool(connector.should_update_logs)


def log_data_summary(logger: Any, summary: dict[str, Any], step: int = 0) -> None:
    """What the data module read, kept and dropped: numbers as `data/*` scalars, all of it as text."""
    if logger is None or not summary:
        return
    numbers = {f"data/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    if numbers:
        logger.log_metrics(numbers, step=step)
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_text"):
        experiment.add_text("data", markdown_table(["key", "value"], [[k, v] for k, v in sorted(summary.items())]), step)


def log_sample_table(logger, tag: str, step: int, num_logged: int, prompts: list[str], texts: list[str],
                     scores: list[float], gold: list[float] | None = None, response: str = "completion") -> None:
    """The first `num_logged` samples as a TensorBoard text table (prompt, response, score[, gold]);
    nothing when the logger cannot hold text."""
    experiment = getattr(logger, "experiment", None)
    if not hasattr(experiment, "add_text"):
        return
    n = num_logged
    header = ["prompt", response, "score"] + (["gold"] if gold is not None else [])
    rows = [[p, t, s] + ([g] if gold is not None else [])
            for p, t, s, g in zip(prompts[:n], texts[:n], scores[:n], (gold or [None] * n)[:n])]
    experiment.add_text(tag, markdown_table(header, rows), step)
