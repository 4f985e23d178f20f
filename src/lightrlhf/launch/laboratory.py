"""The sandbox as a laboratory: experiments only a task with a hidden gold score can run.

`Overoptimisation` (experiment=overoptimisation) reproduces Gao et al. 2022 ("Scaling Laws for Reward
Model Overoptimization") on the demo. A proxy reward model learns from the simulated annotator's
labels; best-of-n and PPO optimise the proxy; the hidden gold scorer says what really happened. For
each seed:

    rm_s<s>           the proxy: a reward model on the SFT model, from `rm` (a small label budget
                      makes it imperfect enough to be gamed; `stage.ensemble=K` makes it an ensemble)
    bon_s<s>          best-of-n from the SFT policy for n = 1, 2, 4, ..., n_max: gold and proxy of
                      the chosen response against d = sqrt(KL_bon(n)), KL_bon(n) = log n - (n-1)/n
    ppo_kl<c>_s<s>    PPO against the proxy with kl.coef = c, evaluated every few rollouts: gold,
                      proxy and KL to SFT along the run (read back from its TensorBoard curves)

The report (overoptimisation.md / .json / .png, and TensorBoard scalars under tb/, step = 1000 d)
fits R(d) = d (alpha - beta d) to best-of-n and R(d) = d (alpha - beta log d) to PPO
(rl/overoptimisation.py), for gold and for the proxy, where R is the gain over the SFT policy
(d = 0); and for every curve it finds gold's peak, what gold gave back by the end (the drop), and
whether the proxy was still rising past gold's peak -- over-optimisation is gold peaking and falling
while the proxy keeps rising.

The conditions of an experiment are overrides: `annotator=noisy` (25% of labels flipped) changes the
data the proxy learns from; `pipeline.loop.ensemble=5` makes the proxy a 5-member ensemble and
`pipeline.loop.aggregate=min` (worst case, WCO) or `uncertainty` (mean - lambda std, UWO) what the
optimisers maximise of it (Coste et al. 2023); so one report format compares them all.
"""

from __future__ import annotations

import glob
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightrlhf.io import atomic_write_text
from lightrlhf.launch.loops import LoopStep, _fmt, _table
from lightrlhf.rl.ensemble import ENSEMBLE_AGGREGATES
from lightrlhf.rl.overoptimisation import Fit, distance, fit, peak_of
from lightrlhf.validation import one_of, positive, require

OVEROPT_TABLE, OVEROPT_POINTS, OVEROPT_PLOT = "overoptimisation.md", "overoptimisation.json", "overoptimisation.png"
GOLD, PROXY, KL = "eval/gold_score", "eval/reward", "eval/kl"


def kl_tag(coef: float) -> str:
    """A step-name-safe spelling of a KL coefficient: 0 -> 0, 0.05 -> 0p05."""
    return f"{coef:g}".replace(".", "p").replace("-", "m")


def read_scalar_events(tb_dir: Path, tags: tuple[str, ...]) -> dict[str, dict[int, list[float]]]:
    """Each tag's values at each step, in the order they were written, from every event file of a run
    (a resumed run has several, read oldest first)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_of: dict[str, list[tuple[float, int, float]]] = {tag: [] for tag in tags}
    for path in glob.glob(str(tb_dir / "**" / "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        available = set(events.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                events_of[tag] += [(e.wall_time, int(e.step), float(e.value)) for e in events.Scalars(tag)]
    out: dict[str, dict[int, list[float]]] = {}
    for tag, events in events_of.items():
        out[tag] = {}
        for _, step, value in sorted(events, key=lambda e: e[0]):
            out[tag].setdefault(step, []).append(value)
    return out


def read_scalar_curves(tb_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) points in order of step; a step written twice (a resumed run) keeps its
    last value."""
    return {tag: sorted((step, values[-1]) for step, values in steps.items())
            for tag, steps in read_scalar_events(tb_dir, tags).items()}


@dataclass(frozen=True)
class Curve:
    """One optimisation's path: distance d = sqrt(KL) from SFT, and gold and proxy gains over SFT."""

    method: str  # best_of_n or ppo_kl<c>
    seed: int
    d: list[float]
    gold: list[float]  # gain over d = 0
    proxy: list[float]
    labels: list[str]  # what each point is: n=<n> or rollout <r>

    def summary(self) -> dict[str, Any]:
        peak = peak_of(self.gold)
        proxy_at_peak, proxy_final = self.proxy[peak.index], self.proxy[-1]
        return {"gold_peak": peak.value, "gold_peak_d": self.d[peak.index], "gold_peak_at": self.labels[peak.index],
                "gold_final": peak.final, "gold_drop": peak.drop, "gold_peaked_and_fell": peak.peaked_and_fell,
                "proxy_final": proxy_final, "proxy_rose_past_gold_peak": proxy_final > proxy_at_peak,
                "overoptimised": peak.peaked_and_fell and proxy_final > proxy_at_peak}


def best_of_n_curve(record: dict[str, Any], seed: int, gold_name: str = "gold_score") -> Curve | None:
    rows = record.get("table") or []
    if not rows or gold_name not in rows[0]:
        return None
    base = rows[0]  # n = 1: the SFT policy itself
    return Curve("best_of_n", seed, [distance(r["kl"]) for r in rows], [r[gold_name] - base[gold_name] for r in rows],
                 [r["reward"] - base["reward"] for r in rows], [f"n={r['n']}" for r in rows])


def ppo_curve(step_dir: Path, method: str, seed: int, initial: dict[str, Any] | None = None) -> Curve | None:
    """The run's evaluations in order: the initial policy (`initial`: its metrics.json `eval/*_initial`,
    KL exactly 0), then each evaluation after r rollouts, which Lightning logs at step r - 1.

    detail: the initial evaluation is logged at step 0 too, so with an evaluation after every rollout
    step 0 holds two values, the initial one first; the initial point is taken from `initial` and
    step 0's later value, when there is one, is the evaluation after the first rollout."""
    events = read_scalar_events(step_dir / "tb", (GOLD, PROXY, KL))
    start = {tag: (initial or {}).get(f"{tag}_initial") for tag in (GOLD, PROXY, KL)}
    if any(v is None for v in start.values()):  # no record: the first value at step 0 is the initial one
        if not all(0 in events[tag] for tag in (GOLD, PROXY, KL)):
            return None
        start = {tag: events[tag][0][0] for tag in (GOLD, PROXY, KL)}
    after = {tag: {step: values[-1] for step, values in events[tag].items() if step > 0 or len(values) > 1}
             for tag in (GOLD, PROXY, KL)}
    steps = sorted(set.intersection(*(set(after[tag]) for tag in (GOLD, PROXY, KL))))
    if not steps:
        return None
    d = [0.0] + [distance(after[KL][s]) for s in steps]
    gold = [0.0] + [after[GOLD][s] - start[GOLD] for s in steps]
    proxy = [0.0] + [after[PROXY][s] - start[PROXY] for s in steps]
    return Curve(method, seed, d, gold, proxy, ["start"] + [f"rollout {s + 1}" for s in steps])


def fits_of(curve: Curve) -> dict[str, Fit | None]:
    form = "best_of_n" if curve.method == "best_of_n" else "rl"
    out: dict[str, Fit | None] = {}
    for what, gains in (("gold", curve.gold), ("proxy", curve.proxy)):
        try:
            out[what] = fit(form, curve.d, gains)
        except ValueError:  # fewer than two points away from the start
            out[what] = None
    return out


@dataclass(frozen=True)
class Overoptimisation:
    """See module docstring. `kl_coefs`: PPO's kl.coef values (0 included to see gold fall)."""

    seeds: list[int]
    kl_coefs: list[float]
    sft: list[str]
    rm: list[str]
    best_of_n: list[str]
    ppo: list[str]
    ensemble: int = 1  # members of the proxy (stage.ensemble of its rm step); 1 = one reward model
    aggregate: str = "mean"  # what best-of-n and PPO maximise of an ensemble proxy (reward.ensemble.aggregate)

    def __post_init__(self) -> None:
        positive("ensemble", self.ensemble)
        one_of("aggregate", self.aggregate, ENSEMBLE_AGGREGATES)
        require(self.aggregate == "mean" or self.ensemble > 1, "aggregate",
                f"{self.aggregate!r} combines the members of an ensemble proxy: set ensemble >= 2")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"must be distinct integers, got {self.seeds}")
        require(len({kl_tag(c) for c in self.kl_coefs}) == len(self.kl_coefs), "kl_coefs",
                f"must be distinct, got {self.kl_coefs}")
        for coef in self.kl_coefs:
            require(coef >= 0, "kl_coefs", f"each must be >= 0, got {coef}")

    def methods(self) -> list[str]:
        return ["best_of_n"] + [f"ppo_kl{kl_tag(c)}" for c in self.kl_coefs]

    def steps(self) -> list[LoopStep]:
        """SFT, every seed's proxy, then the optimisations: those read only SFT and their proxy, so they
        may run beside each other (`pipeline.parallel`), the longest (PPO) first."""
        steps = [LoopStep("sft", list(self.sft), "sft")]
        proxy = list(self.rm) + ["model.name_or_path={sft}/export"] + (
            [f"stage.ensemble={self.ensemble}"] if self.ensemble > 1 else [])
        steps += [LoopStep(f"rm_s{s}", proxy, "rm", (f"seed={s}",)) for s in self.seeds]
        aggregate = [f"reward.ensemble.aggregate={self.aggregate}"] if self.aggregate != "mean" else []

        def wiring(s: int) -> list[str]:  # what every optimisation of seed s starts from and scores with
            return ["policy.init={sft}/export", f"reward.path={{rm_s{s}}}/export"] + aggregate

        for s in self.seeds:
            steps += [LoopStep(f"ppo_kl{kl_tag(c)}_s{s}", list(self.ppo) + wiring(s) + [f"stage.kl.coef={c}"], "ppo",
                               (f"seed={s}",), concurrent=True) for c in self.kl_coefs]
        steps += [LoopStep(f"bon_s{s}", list(self.best_of_n) + wiring(s), "best_of_n", (f"seed={s}",), concurrent=True)
                  for s in self.seeds]
        return steps

    def curves(self, run_dir: Path, results: dict[str, dict[str, Any]]) -> list[Curve]:
        found = []
        for s in self.seeds:
            bon = best_of_n_curve(results.get(f"bon_s{s}") or {}, s)
            found += [bon] if bon is not None else []
            for c in self.kl_coefs:
                method, step = f"ppo_kl{kl_tag(c)}", f"ppo_kl{kl_tag(c)}_s{s}"
                curve = ppo_curve(run_dir / step, method, s, (results.get(step) or {}).get("metrics"))
                found += [curve] if curve is not None else []
        return found

    def report(self, run_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
        """overoptimisation.md / .json / .png and TensorBoard curves; the table's lines."""
        curves = self.curves(run_dir, results)
        points = []
        for curve in curves:
            fits = fits_of(curve)
            rm = (results.get(f"rm_s{curve.seed}") or {}).get("metrics", {})
            points.append({"method": curve.method, "seed": curve.seed, "d": curve.d, "gold_gain": curve.gold,
                           "proxy_gain": curve.proxy, "points": curve.labels, **curve.summary(),
                           "rm_gold_accuracy": rm.get("val/gold_accuracy"),
                           "fits": {what: None if f is None else {"alpha": f.alpha, "beta": f.beta, "r_squared": f.r_squared}
                                    for what, f in fits.items()}})
        lines = self._lines(points)
        atomic_write_text(run_dir / OVEROPT_TABLE, "\n".join(lines) + "\n")
        atomic_write_text(run_dir / OVEROPT_POINTS, json.dumps({"curves": points, "verdict": self._verdict(points)}, indent=1))
        if curves:
            plot_curves(curves, run_dir / OVEROPT_PLOT)
            write_tensorboard(curves, run_dir / "tb")
        return [""] + lines

    def _verdict(self, points: list[dict[str, Any]]) -> dict[str, str]:
        """For each method: in how many seeds gold peaked and fell while the proxy rose."""
        return {m: f"{sum(p['overoptimised'] for p in points if p['method'] == m)}/{len(self.seeds)}"
                for m in self.methods()}

    def _lines(self, points: list[dict[str, Any]]) -> list[str]:
        def coef(p: dict[str, Any], what: str, key: str) -> Any:
            f = p["fits"][what]
            return None if f is None else f[key]

        rows = [[p["method"], p["seed"], p["rm_gold_accuracy"], p["gold_peak"], p["gold_peak_at"], p["gold_final"],
                 p["gold_drop"], p["proxy_final"], "yes" if p["overoptimised"] else "no",
                 coef(p, "gold", "alpha"), coef(p, "gold", "beta"), coef(p, "gold", "r_squared"),
                 coef(p, "proxy", "alpha"), coef(p, "proxy", "beta"), coef(p, "proxy", "r_squared")] for p in points]
        lines = ["gains over the SFT policy against d = sqrt(KL); fits: best-of-n R = d(alpha - beta d), "
                 "PPO R = d(alpha - beta log d) (Gao et al. 2022)"]
        lines += _table(["method", "seed", "proxy RM gold acc.", "gold peak", "at", "gold final", "drop",
                         "proxy final", "gold fell, proxy rose", "gold alpha", "gold beta", "gold R2",
                         "proxy alpha", "proxy beta", "proxy R2"], rows)
        means = []
        for method in self.methods():
            mine = [p for p in points if p["method"] == method]
            if mine:
                means.append(f"{method}: mean gold peak {_fmt(statistics.fmean(p['gold_peak'] for p in mine))}, "
                             f"mean drop {_fmt(statistics.fmean(p['gold_drop'] for p in mine))}")
        lines += [""] + means
        lines += [f"{m}: gold peaked and fell while the proxy rose in {v} seeds" for m, v in self._verdict(points).items()]
        return lines


def plot_curves(curves: list[Curve], out: Path) -> None:
    """Gold gain (solid, left axis) and proxy gain (dashed, right axis: reward-model units, often ten
    times gold's) against d, one panel per method, one colour per seed; the gold fit dotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = list(dict.fromkeys(c.method for c in curves))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.9), dpi=110, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seeds = sorted({c.seed for c in curves})
    proxy_axes = [ax.twinx() for ax in axes[0]]
    for ax, proxy_ax, method in zip(axes[0], proxy_axes, methods):
        for curve in (c for c in curves if c.method == method):
            colour = colours[seeds.index(curve.seed) % len(colours)]
            ax.plot(curve.d, curve.gold, "-o", color=colour, ms=3, label=f"gold, seed {curve.seed}")
            proxy_ax.plot(curve.d, curve.proxy, "--", color=colour, alpha=0.5, label=f"proxy, seed {curve.seed}")
            gold_fit = fits_of(curve)["gold"]
            if gold_fit is not None:
                grid = [max(curve.d) * i / 60 for i in range(61)]
                ax.plot(grid, [gold_fit(x) for x in grid], ":", color=colour, lw=1)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(method.replace("_", " "))
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.set_ylabel("gold gain over SFT (solid; fit dotted)")
        proxy_ax.set_ylabel("proxy gain over SFT (dashed)")
    handles = axes[0][0].get_legend_handles_labels()[0] + proxy_axes[0].get_legend_handles_labels()[0]
    axes[0][0].legend(handles=handles, fontsize=6, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def write_tensorboard(curves: list[Curve], tb_dir: Path) -> None:
    """overoptimisation/<method>/seed<s>/{gold,proxy} at step round(1000 d): TensorBoard plots against
    an integer step, so the x axis reads d in thousandths."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for curve in curves:
            for d, gold, proxy in zip(curve.d, curve.gold, curve.proxy):
                step = int(round(1000 * d))
                writer.add_scalar(f"overoptimisation/{curve.method}/seed{curve.seed}/gold", gold, step)
                writer.add_scalar(f"overoptimisation/{curve.method}/seed{curve.seed}/proxy", proxy, step)
    finally:
        writer.close()
