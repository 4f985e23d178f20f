"""The data report's PNGs (matplotlib, Agg): length histograms, the length-bias bars, margins, scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _figure()
    written = []
    lengths = result["lengths"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    _histogram(axes[0], {"prompt": lengths["prompt"]}, "prompt tokens")
    responses = {k: v for k, v in lengths.items() if k != "prompt"}
    if responses:
        _histogram(axes[1], responses, "response tokens")
    else:
        axes[1].axis("off")
    figure.suptitle(f"{Path(result['source']).name}: {result['rows']['kept']} of {result['rows']['read']} rows kept")
    written.append(_save(plt, figure, out_dir / "lengths.png"))
    bias = result.get("length_bias")
    if bias and bias["pairs"]:
        figure, axis = plt.subplots(figsize=(6, 3.6))
        parts = [("chosen longer", bias["chosen_longer"]), ("same length", bias["same_length"]),
                 ("chosen shorter", bias["chosen_shorter"])]
        axis.bar([name for name, _ in parts], [count / bias["pairs"] for _, count in parts],
                 color=["tab:red" if bias["warning"] else "tab:blue", "tab:gray", "tab:green"])
        axis.set_ylim(0, 1)
        axis.set_ylabel("fraction of pairs")
        flag = "  (warning)" if bias["warning"] else ""
        axis.set_title(f"length-only classifier: {bias['length_only_accuracy']:.1%} accuracy{flag}")
        written.append(_save(plt, figure, out_dir / "length_bias.png"))
    margins = result.get("margins")
    if margins and margins.get("present"):
        figure, axis = plt.subplots(figsize=(6, 3.6))
        edges, counts = margins["histogram"]["edges"], margins["histogram"]["counts"]
        axis.stairs(counts, edges, fill=True)
        axis.set_xlabel("margin")
        axis.set_ylabel("pairs")
        written.append(_save(plt, figure, out_dir / "margins.png"))
    return written


def _histogram(axis, named: dict[str, dict[str, Any]], label: str) -> None:
    for name, summary in named.items():
        if summary.get("count"):
            histogram = summary["histogram"]
            axis.stairs(histogram["counts"], histogram["edges"], label=f"{name} (mean {summary['mean']:.1f})",
                        alpha=0.6 if len(named) > 1 else 1.0, fill=len(named) == 1)
    axis.set_xlabel(label)
    axis.set_ylabel("examples")
    axis.legend()


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
