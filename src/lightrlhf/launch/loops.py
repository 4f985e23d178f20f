"""Pipelines written out by code from a short spec (`pipeline.loop`): the human-in-the-loop recipes.

Both are ordinary `stage=pipeline` runs (launch/pipeline.py): the loop object lists the steps -- each
a train.py stage in its own directory, `{name}` standing for an earlier step's directory -- and
reports on them when they are done. So they resume like any pipeline: `python train.py resume=<run dir>`
skips every finished step (its metrics.json says completed), continues a killed training step from
its checkpoint, and reruns a killed sample_pairs or label step in place, which continues from the
files it left there (stages/sample_pairs.py, stages/label.py). A round is never run twice and no
label is lost or given twice.

Each kind of step takes its overrides from the YAML (`pipeline.loop.<kind>`: what runs, with which
model, data and budget); the loop adds only the wiring between them (which export, which file,
which round). `pipeline.extra.<kind>` adds overrides to every step of that kind.

`IteratedRLHF` (experiment=iterated_rlhf): SFT once, then R rounds of

    pairs_r<n>   stage=sample_pairs   answers of the newest policy (SFT in round 1, PPO of round n-1
                                      after), pairs chosen by the newest reward ensemble (random in
                                      round 1: there is none yet)
    labels_r<n>  stage=label          labelled through the labelling server's HTTP API; prefs.jsonl
                                      holds every label so far
    rm_r<n>      stage=rm             an ensemble on all labels so far, on the SFT model
    ppo_r<n>     stage=ppo            from the SFT model against that reward model

PPO starts from SFT every round, not from the previous round's policy. The KL anchor and the reward
model's base then stay the SFT model (the reward ensemble loads as adapters on the policy's own
base), and the change in gold from one round to the next measures what the new labels bought,
not drift accumulated over rounds; continuing would also carry each round's reward hacking into
the next round's reference. The policy still moves on: each round's candidates are sampled from
the newest PPO policy, so the labels go where the policy goes (the point of iterating).

`ActiveSelection` (experiment=active_selection): does choosing the pairs help, at a fixed budget? For
each seed: a pool of answers from the SFT policy; `seed_pairs` of its pairs labelled at random; an
ensemble trained on them; then for each rule the remaining `budget - seed_pairs` pairs chosen from
the same pool (not those asked already), labelled, and a reward model trained on seed + chosen
labels. The table compares the reward models' `val/gold_accuracy` on the demo's 512 held-out pairs.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightrlhf.io import atomic_write_text
from lightrlhf.rl.selection import RULES
from lightrlhf.validation import positive, require

ROUNDS_TABLE, ROUNDS_POINTS = "rounds.md", "rounds.json"
ACTIVE_TABLE, ACTIVE_POINTS = "active_selection.md", "active_selection.json"


@dataclass(frozen=True)
class LoopStep:
    """A step as the pipeline takes it: `fixed` overrides win over the command line's (a seed per chain)."""

    name: str
    overrides: list[str]
    group: str
    fixed: tuple[str, ...] = ()


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _metrics(results: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return (results.get(name) or {}).get("metrics", {})


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


@dataclass(frozen=True)
class IteratedRLHF:
    """See module docstring. `selection`: the rule of rounds 2 .. R; `pairs_per_round`: the label budget
    of each round; `prompts_per_round`: prompts sampled each round (successive blocks of the data)."""

    rounds: int
    pairs_per_round: int
    prompts_per_round: int
    selection: str
    sft: list[str]
    sample_pairs: list[str]
    label: list[str]
    rm: list[str]
    ppo: list[str]

    def __post_init__(self) -> None:
        positive("rounds", self.rounds)
        positive("pairs_per_round", self.pairs_per_round)
        positive("prompts_per_round", self.prompts_per_round)
        require(self.selection in RULES, "selection", f"must be one of {list(RULES)}, got {self.selection!r}")

    def steps(self) -> list[LoopStep]:
        steps = [LoopStep("sft", list(self.sft), "sft")]
        for n in range(1, self.rounds + 1):
            policy = "{sft}" if n == 1 else f"{{ppo_r{n - 1}}}"
            pairs = list(self.sample_pairs) + [
                f"policy.init={policy}/export", f"stage.selection={'random' if n == 1 else self.selection}",
                f"stage.budget={self.pairs_per_round}", f"stage.num_prompts={self.prompts_per_round}",
                f"stage.first_prompt={(n - 1) * self.prompts_per_round}", f"stage.id_prefix=r{n}-"]
            if n > 1:
                pairs.append(f"stage.reward_model={{rm_r{n - 1}}}/export")
            label = list(self.label) + [f"stage.candidates={{pairs_r{n}}}/candidates.jsonl"]
            if n > 1:
                label.append(f"stage.previous={{labels_r{n - 1}}}")
            rm = list(self.rm) + ["model.name_or_path={sft}/export", f"data.path={{labels_r{n}}}/prefs.jsonl"]
            ppo = list(self.ppo) + ["policy.init={sft}/export", f"reward.path={{rm_r{n}}}/export"]
            steps += [LoopStep(f"pairs_r{n}", pairs, "sample_pairs"), LoopStep(f"labels_r{n}", label, "label"),
                      LoopStep(f"rm_r{n}", rm, "rm"), LoopStep(f"ppo_r{n}", ppo, "ppo")]
        return steps

    def report(self, run_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
        """rounds.md / rounds.json: labels, reward model and policy of each round; the table's lines."""
        rows = []
        sft_gold = None
        for n in range(1, self.rounds + 1):
            pairs, labels = _metrics(results, f"pairs_r{n}"), _metrics(results, f"labels_r{n}")
            rm, ppo = _metrics(results, f"rm_r{n}"), _metrics(results, f"ppo_r{n}")
            sft_gold = ppo.get("eval/gold_score_initial", sft_gold)
            rows.append({"round": n, "selection": "random" if n == 1 else self.selection,
                         "labels_total": _count(labels.get("labels/total_pairs")),
                         "label_gold_agreement": labels.get("labels/gold_agreement"),
                         "pairs_gold_gap": pairs.get("pairs/gold_gap_mean"),
                         "rm_gold_accuracy": rm.get("val/gold_accuracy"), "rm_accuracy": rm.get("val/accuracy"),
                         "ppo_gold": ppo.get("eval/gold_score"), "ppo_win_rate_vs_sft": ppo.get("eval/win_rate_vs_sft"),
                         "ppo_kl": ppo.get("eval/kl"), "sft_gold": ppo.get("eval/gold_score_initial")})
        golds = [r["ppo_gold"] for r in rows]
        rising = all(g is not None for g in golds) and all(b > a for a, b in zip(golds, golds[1:]))
        lines = [f"sft gold: {_fmt(sft_gold)}"] + _table(
            ["round", "selection", "labels so far", "labels agreeing with gold", "gold gap of asked pairs",
             "RM gold accuracy", "PPO gold", "PPO win rate vs SFT", "PPO KL"],
            [[r["round"], r["selection"], r["labels_total"], r["label_gold_agreement"], r["pairs_gold_gap"],
              r["rm_gold_accuracy"], r["ppo_gold"], r["ppo_win_rate_vs_sft"], r["ppo_kl"]] for r in rows])
        lines.append(f"held-out gold rises every round: {'yes' if rising else 'no'}")
        atomic_write_text(run_dir / ROUNDS_TABLE, "\n".join(lines) + "\n")
        atomic_write_text(run_dir / ROUNDS_POINTS, json.dumps({"rounds": rows, "sft_gold": sft_gold,
                                                               "gold_rises_every_round": rising}, indent=1))
        return [""] + lines


@dataclass(frozen=True)
class ActiveSelection:
    """See module docstring. `rules`: compared at the same budget (random among them, as the baseline);
    `pool_prompts`: prompts of the SFT policy's pool, k answers each (the pool step's stage.k)."""

    seeds: list[int]
    rules: list[str]
    seed_pairs: int
    budget: int
    pool_prompts: int
    sft: list[str]
    pool: list[str]
    label: list[str]
    ensemble: list[str]
    select: list[str]
    rm: list[str]
    baseline: str = "random"

    def __post_init__(self) -> None:
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"must be distinct integers, got {self.seeds}")
        require(bool(self.rules) and all(r in RULES for r in self.rules), "rules",
                f"each must be one of {list(RULES)}, got {self.rules}")
        require(self.baseline in self.rules, "rules", f"must include the baseline {self.baseline!r}")
        positive("seed_pairs", self.seed_pairs)
        require(self.budget > self.seed_pairs, "budget", f"must exceed seed_pairs={self.seed_pairs}, got {self.budget}")
        positive("pool_prompts", self.pool_prompts)

    def steps(self) -> list[LoopStep]:
        steps = [LoopStep("sft", list(self.sft), "sft")]
        for s in self.seeds:
            seed = (f"seed={s}",)
            pool, seed_labels, ensemble = f"pool_s{s}", f"seed_labels_s{s}", f"ensemble_s{s}"
            steps += [
                LoopStep(pool, list(self.pool) + ["policy.init={sft}/export", "stage.selection=random",
                                                  f"stage.budget={self.seed_pairs}", f"stage.num_prompts={self.pool_prompts}",
                                                  f"stage.id_prefix=s{s}-seed-"], "pool", seed),
                LoopStep(seed_labels, list(self.label) + [f"stage.candidates={{{pool}}}/candidates.jsonl"], "label", seed),
                LoopStep(ensemble, list(self.ensemble) + ["model.name_or_path={sft}/export",
                                                          f"data.path={{{seed_labels}}}/prefs.jsonl"], "ensemble", seed)]
            for rule in self.rules:
                chosen, labels = f"select_{rule}_s{s}", f"labels_{rule}_s{s}"
                steps += [
                    LoopStep(chosen, list(self.select) + [
                        "policy.init={sft}/export", f"stage.pool={{{pool}}}/pool.jsonl",
                        f"stage.exclude=[{{{pool}}}/candidates.jsonl]", f"stage.selection={rule}",
                        f"stage.reward_model={{{ensemble}}}/export", f"stage.budget={self.budget - self.seed_pairs}",
                        f"stage.num_prompts={self.pool_prompts}", f"stage.id_prefix=s{s}-{rule}-"], "select", seed),
                    LoopStep(labels, list(self.label) + [f"stage.candidates={{{chosen}}}/candidates.jsonl",
                                                         f"stage.previous={{{seed_labels}}}"], "labels", seed),
                    LoopStep(f"rm_{rule}_s{s}", list(self.rm) + ["model.name_or_path={sft}/export",
                                                                 f"data.path={{{labels}}}/prefs.jsonl"], "rm", seed)]
        return steps

    def report(self, run_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
        """active_selection.md / .json: each seed's gold accuracy per rule; the table's lines."""
        points = []
        for s in self.seeds:
            row: dict[str, Any] = {"seed": s, "ensemble_gold_accuracy": _metrics(results, f"ensemble_s{s}").get(
                "val/gold_accuracy")}
            for rule in self.rules:
                rm, chosen = _metrics(results, f"rm_{rule}_s{s}"), _metrics(results, f"select_{rule}_s{s}")
                labels = _metrics(results, f"labels_{rule}_s{s}")
                row[rule] = {"gold_accuracy": rm.get("val/gold_accuracy"), "accuracy": rm.get("val/accuracy"),
                             "labels": _count(labels.get("labels/total_pairs")),
                             "label_gold_agreement": labels.get("labels/gold_agreement"),
                             "pairs_gold_gap": chosen.get("pairs/gold_gap_mean")}
            points.append(row)
        others = [r for r in self.rules if r != self.baseline]
        header = ["seed", "seed-set ensemble"] + [f"{r}" for r in self.rules]
        rows = [[p["seed"], p["ensemble_gold_accuracy"]] + [p[r]["gold_accuracy"] for r in self.rules] for p in points]
        summary: dict[str, Any] = {}
        for rule in self.rules:
            values = [p[rule]["gold_accuracy"] for p in points if p[rule]["gold_accuracy"] is not None]
            summary[rule] = {"mean": statistics.fmean(values) if values else None,
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        for rule in others:
            wins = [p[rule]["gold_accuracy"] is not None and p[self.baseline]["gold_accuracy"] is not None
                    and p[rule]["gold_accuracy"] > p[self.baseline]["gold_accuracy"] for p in points]
            summary[rule]["beats_baseline"] = f"{sum(wins)}/{len(wins)}"
        rows.append(["mean", None] + [summary[r]["mean"] for r in self.rules])
        lines = [f"held-out gold accuracy of reward models trained on {self.budget} labels "
                 f"({self.seed_pairs} random, then {self.budget - self.seed_pairs} chosen by each rule)"]
        lines += _table(header, rows)
        lines += [f"{rule} beats {self.baseline} in {summary[rule]['beats_baseline']} seeds" for rule in others]
        gaps = _table(["seed"] + [f"{r}: gold gap / label-gold agreement" for r in self.rules],
                      [[p["seed"]] + [f"{_fmt(p[r]['pairs_gold_gap'])} / {_fmt(p[r]['label_gold_agreement'])}"
                                      for r in self.rules] for p in points])
        atomic_write_text(run_dir / ACTIVE_TABLE, "\n".join(lines + [""] + gaps) + "\n")
        atomic_write_text(run_dir / ACTIVE_POINTS, json.dumps({"budget": self.budget, "seed_pairs": self.seed_pairs,
                                                               "seeds": points, "summary": summary}, indent=1))
        return [""] + lines
