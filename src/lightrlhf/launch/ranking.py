"""A ranking of the methods a pipeline ran for several seeds (`experiment=method_ranking`).

Each seeded step (`dpo_seed0`, `dpo_seed1`, ...) is one point: its held-out gold score, win rate
against the SFT policy, KL to the SFT policy and wall time, read from its `metrics.json`:

- PPO, GRPO, RLOO and DPO measure themselves at the end on the held-out prompts with a fixed
  sampling seed (`eval/gold_score`, `eval/win_rate_vs_sft`, `eval/kl`, the k1 estimate summed over the
  response); at their start they measured the SFT policy the same way (`*_initial`). On the same
  prompts and seeds those starts are the same draws, which the SFT row shows as its spread.
- best-of-n reports the largest n it ran: the unbiased estimate of the best-of-n gold score, the win
  rate against one draw of the SFT policy, and the analytic KL log n - (n-1)/n (rl/best_of_n.py).

Writes `ranking.md` (the table), `ranking.json` (every point) and `ranking.png` (gold against KL,
one dot per seed, the mean with its standard deviation as bars) in the pipeline's directory.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightrlhf.io import atomic_write_bytes, atomic_write_text

RANKING_TABLE, RANKING_POINTS, RANKING_PLOT = "ranking.md", "ranking.json", "ranking.png"
# the stages that measure their start (the SFT policy) and their end on the same held-out prompts and seed
FROM_SFT = ("ppo", "grpo", "rloo", "reward_weighted", "dpo")


@dataclass(frozen=True)
class Point:
    """One seed of one method."""

    method: str
    seed: int | None
    gold: float
    win_rate_vs_sft: float
    kl: float
    wall_time_s: float | None
    sft_gold: float | None  # the SFT policy measured by this run (its start, or best-of-1)
    sft_gold_std: float | None  # the spread of the SFT policy's gold over the prompts


def method_point(name: str, group: str, seed: int | None, record: dict[str, Any]) -> Point | None:
    """The point of one finished step, or None for a stage the ranking does not read."""
    metrics, stage = record.get("metrics", {}), record.get("stage", group)
    if stage in FROM_SFT and "eval/gold_score" in metrics:
        return Point(stage.upper(), seed, metrics["eval/gold_score"], metrics.get("eval/win_rate_vs_sft", float("nan")),
                     metrics.get("eval/kl", float("nan")), record.get("wall_time_s"),
                     metrics.get("eval/gold_score_initial"), metrics.get("eval/gold_score_std_initial"))
    if stage == "best_of_n":
        sizes = sorted(int(key.split("/")[1]) for key in metrics if key.startswith("best_of_n/")
                       and key.endswith("/gold_score"))
        if not sizes:
            return None
        n = sizes[-1]
        return Point(f"best-of-{n}", seed, metrics[f"best_of_n/{n}/gold_score"],
                     metrics[f"best_of_n/{n}/win_rate_vs_n1"], metrics[f"best_of_n/{n}/kl"], record.get("wall_time_s"),
                     metrics.get("best_of_n/1/gold_score"), None)
    return None


@dataclass(frozen=True)
class Row:
    method: str
    seeds: int
    gold: tuple[float, float]  # mean, std over seeds
    win_rate_vs_sft: tuple[float, float]
    kl: tuple[float, float]
    wall_time_s: float | None  # mean per seed


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rank(points: Sequence[Point], sft_wall_time_s: float | None) -> tuple[list[Row], dict[str, float]]:
    """Rows by mean gold score, best first, with the SFT policy's own row; and what the SFT row is
    made of (the starts of the methods that measure one, their spread)."""
    methods: dict[str, list[Point]] = {}
    for point in points:
        methods.setdefault(point.method, []).append(point)
    rows = []
    for method, group in methods.items():
        walls = [p.wall_time_s for p in group if p.wall_time_s is not None]
        rows.append(Row(method, len(group), _mean_std([p.gold for p in group]),
                        _mean_std([p.win_rate_vs_sft for p in group]), _mean_std([p.kl for p in group]),
                        statistics.fmean(walls) if walls else None))
    starts = [p.sft_gold for p in points if p.method.lower() in FROM_SFT and p.sft_gold is not None]
    stds = [p.sft_gold_std for p in points if p.sft_gold_std is not None]
    sft: dict[str, float] = {}
    if starts:
        sft = {"gold": statistics.fmean(starts), "gold_min": min(starts), "gold_max": max(starts),
               "measurements": len(starts)}
        if stds:
            sft["gold_std_over_prompts"] = statistics.fmean(stds)
        rows.append(Row("SFT", 1, (sft["gold"], 0.0), (0.5, 0.0), (0.0, 0.0), sft_wall_time_s))
    rows.sort(key=lambda r: r.gold[0], reverse=True)
    return rows, sft


def markdown(rows: Sequence[Row], sft: dict[str, float]) -> list[str]:
    def pm(value: tuple[float, float], digits: int = 3) -> str:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    scale = sft.get("gold_std_over_prompts")
    lines = ["| rank | method | seeds | gold (mean ± std) | gain in SFT std | win rate vs SFT | KL to SFT (nats) "
             "| wall time per seed |", "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        gain = f"{(row.gold[0] - sft['gold']) / scale:+.2f}" if scale and sft else "-"
        wall = f"{row.wall_time_s:.0f} s" if row.wall_time_s is not None else "-"
        lines.append(f"| {i} | {row.method} | {row.seeds} | {pm(row.gold)} | {gain} | {pm(row.win_rate_vs_sft)} | "
                     f"{pm(row.kl, 2)} | {wall} |")
    if sft:
        lines.append("")
        lines.append(f"SFT: the gold score of the SFT policy as {int(sft['measurements'])} runs measured it at their "
                     f"start on the same held-out prompts and sampling seeds: {sft['gold_min']:.4f} to "
                     f"{sft['gold_max']:.4f}" + (f"; its std over prompts {scale:.3f}" if scale else "") + ".")
    return lines


def plot(points: Sequence[Point], rows: Sequence[Row], sft: dict[str, float]) -> bytes:
    """Gold against KL: one dot per seed, the method's mean with std bars (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(r for r in rows if r.method != "SFT"):
        colour = colours[i % len(colours)]
        mine = [p for p in points if p.method == row.method]
        ax.scatter([p.kl for p in mine], [p.gold for p in mine], s=14, alpha=0.45, color=colour)
        ax.errorbar(row.kl[0], row.gold[0], xerr=row.kl[1], yerr=row.gold[1], fmt="o", ms=6, capsize=3,
                    color=colour, label=f"{row.method} ({row.seeds} seeds)")
    if sft:
        ax.scatter([0.0], [sft["gold"]], marker="*", s=120, color="black", label="SFT", zorder=3)
    ax.set_xlabel("KL to the SFT policy (nats per response)")
    ax.set_ylabel("held-out gold score")
    ax.set_title("Methods from one SFT model: gold score against KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_ranking(run_dir: Path, steps: Sequence[Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """Rank the seeded steps of a finished pipeline; write the table, the points and the plot;
    return the table's lines (to be logged)."""
    points = [point for step in steps if step.seed is not None and step.name in results
              if (point := method_point(step.name, step.group, step.seed, results[step.name])) is not None]
    if not points:
        return []
    sft_wall = next((r.get("wall_time_s") for r in results.values() if r.get("stage") == "sft"), None)
    rows, sft = rank(points, sft_wall)
    table = markdown(rows, sft)
    atomic_write_text(run_dir / RANKING_TABLE, "\n".join(table) + "\n")
    atomic_write_text(run_dir / RANKING_POINTS, json.dumps(
        {"points": [asdict(p) for p in points], "rows": [asdict(r) for r in rows], "sft": sft}, indent=1))
    atomic_write_bytes(run_dir / RANKING_PLOT, plot(points, rows, sft))
    return ["", "method ranking (held-out gold score, mean ± std over seeds):", *table,
            f"ranking: {run_dir / RANKING_TABLE}, {run_dir / RANKING_PLOT}"]
