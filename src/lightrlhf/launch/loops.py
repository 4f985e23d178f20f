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
    rm_r<n>      stage=rm             an ensemble on all labels so far, on the round's starting policy
    ppo_r<n>     stage=ppo            from the round's starting policy against that reward model

`ppo_from` says where each round's PPO starts:

- `previous` (iterated online RLHF, Bai et al. 2022, sec. 4.5): round n continues from round n-1's
  policy. That policy becomes the round's frozen base, its KL reference and the reward ensemble's
  base (the ensemble then loads as adapters on the policy's own base, and the value function starts
  from its first member). The KL penalty is a trust region around the last round's policy, and the
  reward model that judges round n is trained on labels of round n-1's answers, so what the last
  round over-optimised is what the new labels correct. Gains accumulate over rounds.
- `sft`: every round starts again from the SFT model, against a reward model on the SFT model. The
  change in gold from one round to the next then measures only what the new labels bought (an
  ablation); the policy still moves on in that each round's candidates come from the newest PPO
  policy.

`ActiveSelection` (experiment=active_selection): does choosing the pairs help, at a fixed budget? For
each seed: a pool of answers from the SFT policy; `seed_pairs` of its pairs labelled at random; an
ensemble trained on them; then for each rule the remaining `budget - seed_pairs` pairs chosen from
the same pool (not those asked already), labelled, and a reward model trained on seed + chosen
labels. Two held-out measures of each reward model's gold accuracy: `val/gold_accuracy` on the demo's
512 held-out comparisons (demonstrator answers, far apart in gold), and, with `heldout` set, on every
pair of the SFT policy's own answers to held-out prompts (`heldout_pool`, sampled once; a
`heldout_<rule>_s<seed>` step scores it with each reward model, `pairs/gold_accuracy_pool`). The
second is the distribution the pool is drawn from and the one a reward model is used on: ranking
this policy's answers, for PPO or best-of-n.

With `batches` B > 1 a model-guided rule spends the chosen budget in B batches, as active learning
does (Settles 2009, sec. 6.1; Christiano et al. 2017 ask continually as the ensemble learns): after
each batch the ensemble is retrained on every label so far, and the next batch is chosen by it. An
ensemble of the seed set alone knows little, so its disagreement is partly noise; each retraining
sharpens what the next batch asks. `random` needs no model and is chosen in one batch (the same
pairs as B batches of random draws would be, in distribution).

    select_<rule>_s<seed>_b<b>   pairs chosen by the newest ensemble, none asked before
    labels_<rule>_s<seed>_b<b>   labelled; prefs.jsonl holds every label of this rule so far
    ensemble_<rule>_s<seed>_b<b> the ensemble on those labels (b < B), which chooses batch b + 1
    rm_<rule>_s<seed>            the reward model on all `budget` labels
    heldout_<rule>_s<seed>       its gold accuracy on the held-out pool (with `heldout`)
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
from lightrlhf.training.reporting import markdown_table
from lightrlhf.validation import positive, require

ROUNDS_TABLE, ROUNDS_POINTS = "rounds.md", "rounds.json"
ACTIVE_TABLE, ACTIVE_POINTS = "active_selection.md", "active_selection.json"
HELDOUT_POOL = "heldout_pool"  # experiment=active_selection's answers of the SFT policy to held-out prompts
PPO_STARTS = ("previous", "sft")


@dataclass(frozen=True)
class LoopStep:
    """A step as the pipeline takes it: `fixed` overrides win over the command line's (a seed per chain)."""

    name: str
    overrides: list[str]
    group: str
    fixed: tuple[str, ...] = ()
    # may run beside the other concurrent steps, each in its own process (pipeline.parallel > 1); it
    # must not read another concurrent step's directory (the pipeline checks)
    concurrent: bool = False


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _metrics(results: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return (results.get(name) or {}).get("metrics", {})


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _weighted_mean(pairs: list[tuple[Any, int]]) -> float | None:
    """The mean of the values weighted by their counts; None when any value is missing."""
    if not pairs or any(v is None for v, _ in pairs):
        return None
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The reports' markdown table as lines; a missing value shows as "-"."""
    return markdown_table(header, [[_fmt(v) for v in row] for row in rows]).splitlines()


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
    ppo_from: str = "previous"

    def __post_init__(self) -> None:
        require(self.ppo_from in PPO_STARTS, "ppo_from", f"must be one of {list(PPO_STARTS)}, got {self.ppo_from!r}")
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
            start = "{sft}" if n == 1 or self.ppo_from == "sft" else f"{{ppo_r{n - 1}}}"
            rm = list(self.rm) + [f"model.name_or_path={start}/export", f"data.path={{labels_r{n}}}/prefs.jsonl"]
            ppo = list(self.ppo) + [f"policy.init={start}/export", f"reward.path={{rm_r{n}}}/export"]
            steps += [LoopStep(f"pairs_r{n}", pairs, "sample_pairs"), LoopStep(f"labels_r{n}", label, "label"),
                      LoopStep(f"rm_r{n}", rm, "rm"), LoopStep(f"ppo_r{n}", ppo, "ppo")]
        return steps

    def report(self, run_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
        """rounds.md / rounds.json: labels, reward model and policy of each round; the table's lines."""
        rows = []
        # round 1 starts from SFT either way; with ppo_from=previous later rounds start from their predecessor
        sft_gold = _metrics(results, "ppo_r1").get("eval/gold_score_initial")
        for n in range(1, self.rounds + 1):
            pairs, labels = _metrics(results, f"pairs_r{n}"), _metrics(results, f"labels_r{n}")
            rm, ppo = _metrics(results, f"rm_r{n}"), _metrics(results, f"ppo_r{n}")
            rows.append({"round": n, "selection": "random" if n == 1 else self.selection,
                         "labels_total": _count(labels.get("labels/total_pairs")),
                         "label_gold_agreement": labels.get("labels/gold_agreement"),
                         "pairs_gold_gap": pairs.get("pairs/gold_gap_mean"),
                         "rm_gold_accuracy": rm.get("val/gold_accuracy"), "rm_accuracy": rm.get("val/accuracy"),
                         "ppo_gold": ppo.get("eval/gold_score"), "ppo_win_rate_vs_sft": ppo.get("eval/win_rate_vs_sft"),
                         "ppo_kl": ppo.get("eval/kl"), "start_gold": ppo.get("eval/gold_score_initial")})
        golds = [r["ppo_gold"] for r in rows]
        rising = all(g is not None for g in golds) and all(b > a for a, b in zip(golds, golds[1:]))
        start = "SFT" if self.ppo_from == "sft" else "its start"
        lines = [f"sft gold: {_fmt(sft_gold)}; PPO starts each round from "
                 + ("the SFT model" if self.ppo_from == "sft" else "the previous round's policy")] + _table(
            ["round", "selection", "labels so far", "labels agreeing with gold", "gold gap of asked pairs",
             "RM gold accuracy", "PPO gold at start", "PPO gold", f"PPO win rate vs {start}", f"PPO KL to {start}"],
            [[r["round"], r["selection"], r["labels_total"], r["label_gold_agreement"], r["pairs_gold_gap"],
              r["rm_gold_accuracy"], r["start_gold"], r["ppo_gold"], r["ppo_win_rate_vs_sft"], r["ppo_kl"]]
             for r in rows])
        lines.append(f"held-out gold rises every round: {'yes' if rising else 'no'}")
        atomic_write_text(run_dir / ROUNDS_TABLE, "\n".join(lines) + "\n")
        atomic_write_text(run_dir / ROUNDS_POINTS, json.dumps({"rounds": rows, "sft_gold": sft_gold,
                                                               "ppo_from": self.ppo_from,
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
    batches: int = 1
    heldout: list[str] | tuple[str, ...] = ()  # sample_pairs of held-out prompts; () = not measured

    def __post_init__(self) -> None:
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"must be distinct integers, got {self.seeds}")
        require(bool(self.rules) and all(r in RULES for r in self.rules), "rules",
                f"each must be one of {list(RULES)}, got {self.rules}")
        require(self.baseline in self.rules, "rules", f"must include the baseline {self.baseline!r}")
        positive("seed_pairs", self.seed_pairs)
        require(self.budget > self.seed_pairs, "budget", f"must exceed seed_pairs={self.seed_pairs}, got {self.budget}")
        positive("pool_prompts", self.pool_prompts)
        positive("batches", self.batches)
        require(self.batches <= self.budget - self.seed_pairs, "batches",
                f"must be at most budget - seed_pairs = {self.budget - self.seed_pairs}, got {self.batches}")

    def batch_budgets(self, rule: str) -> list[int]:
        """The chosen labels of each batch: `budget - seed_pairs` split as evenly as it goes."""
        chosen, batches = self.budget - self.seed_pairs, 1 if rule == "random" else self.batches
        return [chosen // batches + (1 if b < chosen % batches else 0) for b in range(batches)]

    def step_names(self, rule: str, seed: int) -> list[tuple[str, str, str]]:
        """(select, labels, ensemble) step names of each batch; one batch keeps the unsuffixed names."""
        batches = len(self.batch_budgets(rule))
        tail = [""] if batches == 1 else [f"_b{b}" for b in range(1, batches + 1)]
        return [(f"select_{rule}_s{seed}{t}", f"labels_{rule}_s{seed}{t}", f"ensemble_{rule}_s{seed}{t}") for t in tail]

    def heldout_step(self, name: str, group: str, *wiring: str) -> LoopStep:
        """A sample_pairs step on the held-out prompts that asks nothing (one pair, never labelled)."""
        return LoopStep(name, list(self.heldout) + ["policy.init={sft}/export", "stage.selection=random",
                                                    "stage.budget=1", "stage.id_prefix=heldout-", *wiring], group)

    def evaluation(self, name: str, reward_model: str) -> LoopStep:
        """The step that scores the held-out pool with `reward_model`'s export: its gold accuracy on the
        SFT policy's own answers (pairs/gold_accuracy_pool)."""
        return self.heldout_step(name, "evaluate", f"stage.pool={{{HELDOUT_POOL}}}/pool.jsonl",
                                 f"stage.reward_model={{{reward_model}}}/export")

    def steps(self) -> list[LoopStep]:
        steps = [LoopStep("sft", list(self.sft), "sft")]
        if self.heldout:  # answers of the SFT policy to held-out prompts, once for every seed and rule
            steps.append(self.heldout_step(HELDOUT_POOL, "heldout"))
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
            if self.heldout:
                steps.append(self.evaluation(f"heldout_ensemble_s{s}", ensemble))
            for rule in self.rules:
                asked, guide, previous = [f"{{{pool}}}/candidates.jsonl"], ensemble, seed_labels
                names = self.step_names(rule, s)
                for b, (budget, (chosen, labels, retrained)) in enumerate(zip(self.batch_budgets(rule), names), 1):
                    steps += [
                        LoopStep(chosen, list(self.select) + [
                            "policy.init={sft}/export", f"stage.pool={{{pool}}}/pool.jsonl",
                            f"stage.exclude=[{','.join(asked)}]", f"stage.selection={rule}",
                            f"stage.reward_model={{{guide}}}/export", f"stage.budget={budget}",
                            f"stage.num_prompts={self.pool_prompts}",
                            f"stage.id_prefix=s{s}-{rule}-" + (f"b{b}-" if len(names) > 1 else "")], "select", seed),
                        LoopStep(labels, list(self.label) + [f"stage.candidates={{{chosen}}}/candidates.jsonl",
                                                             f"stage.previous={{{previous}}}"], "labels", seed)]
                    asked.append(f"{{{chosen}}}/candidates.jsonl")
                    previous = labels
                    if b < len(names):  # the ensemble that chooses the next batch, on every label so far
                        steps.append(LoopStep(retrained, list(self.ensemble) + [
                            "model.name_or_path={sft}/export", f"data.path={{{labels}}}/prefs.jsonl"], "ensemble", seed))
                        guide = retrained
                steps.append(LoopStep(f"rm_{rule}_s{s}", list(self.rm) + ["model.name_or_path={sft}/export",
                                                                          f"data.path={{{previous}}}/prefs.jsonl"], "rm", seed))
                if self.heldout:
                    steps.append(self.evaluation(f"heldout_{rule}_s{s}", f"rm_{rule}_s{s}"))
        return steps

    def report(self, run_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
        """active_selection.md / .json: each seed's gold accuracy per rule, on both held-out sets; the lines."""
        points = []
        for s in self.seeds:
            row: dict[str, Any] = {"seed": s, "ensemble_gold_accuracy": _metrics(results, f"ensemble_s{s}").get(
                "val/gold_accuracy"), "ensemble_policy_pairs_gold_accuracy": _metrics(
                results, f"heldout_ensemble_s{s}").get("pairs/gold_accuracy_pool")}
            for rule in self.rules:
                names, sizes = self.step_names(rule, s), self.batch_budgets(rule)
                rm, last_labels = _metrics(results, f"rm_{rule}_s{s}"), _metrics(results, names[-1][1])
                # the chosen pairs' figures over all batches, each batch weighted by its size
                gaps = [(_metrics(results, chosen).get("pairs/gold_gap_mean"), n) for (chosen, _, _), n in zip(names, sizes)]
                agreements = [(_metrics(results, labels).get("labels/gold_agreement"), n)
                              for (_, labels, _), n in zip(names, sizes)]
                row[rule] = {"gold_accuracy": rm.get("val/gold_accuracy"), "accuracy": rm.get("val/accuracy"),
                             "policy_pairs_gold_accuracy": _metrics(results, f"heldout_{rule}_s{s}").get(
                                 "pairs/gold_accuracy_pool"),
                             "labels": _count(last_labels.get("labels/total_pairs")),
                             "label_gold_agreement": _weighted_mean(agreements),
                             "pairs_gold_gap": _weighted_mean(gaps),
                             "batch_ensembles_gold_accuracy": [_metrics(results, ensemble).get("val/gold_accuracy")
                                                               for _, _, ensemble in names[:-1]]}
            points.append(row)
        # the pool's size as a reward model's scoring of it counts it (the pool step itself scores nothing)
        scored = next((m for s in self.seeds for r in self.rules
                       if "pairs/gold_decided_pool" in (m := _metrics(results, f"heldout_{r}_s{s}"))), {})
        measures = [("gold_accuracy", "ensemble_gold_accuracy", "the demo's held-out comparisons (demonstrator pairs)")]
        if self.heldout:
            measures.append(("policy_pairs_gold_accuracy", "ensemble_policy_pairs_gold_accuracy",
                             f"every pair of the SFT policy's answers to {_count(scored.get('pairs/pool_prompts'))} "
                             f"held-out prompts ({_count(scored.get('pairs/gold_decided_pool'))} pairs whose gold differs)"))
        lines = [f"gold accuracy of reward models trained on {self.budget} labels ({self.seed_pairs} random, then "
                 f"{self.budget - self.seed_pairs} chosen by each rule"
                 + (f", in {self.batches} batches for the model-guided rules" if self.batches > 1 else "") + ")"]
        summary: dict[str, Any] = {}
        for key, ensemble_key, title in measures:
            summary[key] = self.summary(points, key)
            lines += ["", f"on {title}:"]
            lines += _table(["seed", "seed-set ensemble"] + list(self.rules),
                            [[p["seed"], p[ensemble_key]] + [p[r][key] for r in self.rules] for p in points]
                            + [["mean", None] + [summary[key][r]["mean"] for r in self.rules]])
            lines += [f"{rule} beats {self.baseline} in {summary[key][rule]['beats_baseline']} seeds"
                      for rule in self.rules if rule != self.baseline]
        gaps = _table(["seed"] + [f"{r}: gold gap / label-gold agreement" for r in self.rules],
                      [[p["seed"]] + [f"{_fmt(p[r]['pairs_gold_gap'])} / {_fmt(p[r]['label_gold_agreement'])}"
                                      for r in self.rules] for p in points])
        atomic_write_text(run_dir / ACTIVE_TABLE, "\n".join(lines + [""] + gaps) + "\n")
        atomic_write_text(run_dir / ACTIVE_POINTS, json.dumps({"budget": self.budget, "seed_pairs": self.seed_pairs,
                                                               "batches": self.batches, "seeds": points,
                                                               "summary": summary}, indent=1))
        return [""] + lines

    def summary(self, points: list[dict[str, Any]], key: str) -> dict[str, Any]:
        """Per rule: mean and std over seeds of `key`, and in how many seeds it beats the baseline."""
        out: dict[str, Any] = {}
        for rule in self.rules:
            values = [p[rule][key] for p in points if p[rule][key] is not None]
            out[rule] = {"mean": statistics.fmean(values) if values else None,
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        for rule in self.rules:
            if rule != self.baseline:
                wins = [p[rule][key] is not None and p[self.baseline][key] is not None
                        and p[rule][key] > p[self.baseline][key] for p in points]
                out[rule]["beats_baseline"] = f"{sum(wins)}/{len(wins)}"
        return out
