"""Curves of several stage=pbrl runs, grouped, as mean +- std over each group's runs (seeds):

    python -m lightrlhf.control.plot --group disagreement outputs/dis/seed* --group random outputs/rand/seed* \
        --out docs/pbrl-cartpole.png

Left: the deterministic evaluation's true return against training environment steps. Right: the same
return against the queries used by then. A run that stopped once solved (stage.stop_when_solved) keeps
its last value to the end of the axis. A run directory that cannot be read is one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lightrlhf.errors import UserError


def run_curve(run_dir: Path) -> dict[str, np.ndarray]:
    """(env_steps, queries, true_return) at each evaluation of a run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tb").is_dir():
        raise UserError(f"{run_dir}: no tb/ directory (is it a stage=pbrl run directory?)")
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "eval/true_return" not in tags:
        raise UserError(f"{run_dir}: no eval/true_return in its TensorBoard events")

    def series(tag: str) -> tuple[np.ndarray, np.ndarray]:
        points = events.Scalars(tag) if tag in tags else []
        return np.array([p.step for p in points]), np.array([p.value for p in points])

    def before(tag: str, step: int) -> float:
        """The value logged at the latest step < `step` (an evaluation after iteration i is logged at
        step i, the counters of iteration i - 1 at step i - 1); 0 before any."""
        steps, values = series(tag)
        earlier = values[steps < step]
        return float(earlier[-1]) if len(earlier) else 0.0

    steps, returns = series("eval/true_return")
    return {"env_steps": np.array([before("progress/env_steps", s + 1) if s else 0.0 for s in steps]),
            "queries": np.array([before("progress/queries", s + 1) if s else 0.0 for s in steps]),
            "true_return": returns}


def on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """y of the latest point with x <= each grid value (a step function), the first y before the first x."""
    index = np.searchsorted(x, grid, side="right") - 1
    return y[np.clip(index, 0, len(y) - 1)]


def plot(groups: dict[str, list[Path]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: [run_curve(d) for d in dirs] for name, dirs in groups.items()}
    max_steps = max(c["env_steps"].max() for runs in curves.values() for c in runs)
    max_queries = max(c["queries"].max() for runs in curves.values() for c in runs)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, key, top in ((left, "env_steps", max_steps), (right, "queries", max_queries)):
        grid = np.linspace(0, top, 200)
        for name, runs in curves.items():
            # detail: on the queries axis a run's x stops growing once its budget is spent; the latest
            # evaluation at each query count is what that many queries bought
            ys = np.stack([on_grid(c[key], c["true_return"], grid) for c in runs])
            mean, std = ys.mean(0), ys.std(0)
            axis.plot(grid, mean, label=f"{name} ({len(runs)} seeds)")
            axis.fill_between(grid, mean - std, mean + std, alpha=0.2)
        axis.set_xlabel("environment steps" if key == "env_steps" else "queries used")
        axis.grid(alpha=0.3)
    left.set_ylabel("true return (deterministic evaluation)")
    left.axhline(475, color="grey", linestyle="--", linewidth=0.8)
    right.axhline(475, color="grey", linestyle="--", linewidth=0.8)
    right.legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightrlhf.control.plot", description=__doc__.split("\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                        help="a group's name, then its run directories")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="PbRL on CartPole: mean +- std over seeds")
    args = parser.parse_args(argv)
    try:
        groups = {}
        for name, *dirs in args.group:
            if not dirs:
                raise UserError(f"--group {name}: no run directories")
            groups[name] = [Path(d) for d in dirs]
        plot(groups, Path(args.out), args.title)
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
