"""How the labels look: who labelled what, how far annotators agree, how far a reward model agrees.

Agreement between two annotators is Cohen's kappa (Cohen 1960) on the pairs both labelled, over the
categories a, b, tie, both_bad ("skip" is not a judgement, so a pair either skipped is left out):

    kappa = (p_o - p_e) / (1 - p_e),   p_o = share of shared pairs with the same label,
                                      p_e = sum_k p1(k) * p2(k)   (each annotator's own label shares)

kappa is undefined (None) when p_e = 1, i.e. both used one and the same category throughout.

Agreement with a reward model: on each annotator's "a"/"b" labels, the share where the model scores
the preferred response higher (equal scores count one half). Scores come from the project's scorer
(`lightrlhf.rewards.scorer.Scorer`) over the export, prompt + response, exactly as PPO would score them.
"""

from __future__ import annotations

import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from lightrlhf.feedback.candidates import Candidate
from lightrlhf.feedback.labels import CHOICES, Label

JUDGEMENTS = ("a", "b", "tie", "both_bad")


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (in the same order)."""
    if len(first) != len(second) or not first:
        raise ValueError("two non-empty label lists of equal length are needed")
    n = len(first)
    observed = sum(x == y for x, y in zip(first, second)) / n
    counts1, counts2 = Counter(first), Counter(second)
    expected = sum(counts1[k] * counts2[k] for k in counts1) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


@dataclass
class AnnotatorStats:
    name: str
    labels: int
    choices: dict[str, int]
    median_seconds: float
    reward_model_agreement: float | None = None  # share of a/b labels the reward model agrees with
    reward_model_pairs: int = 0


@dataclass
class PairAgreement:
    first: str
    second: str
    shared: int  # pairs both judged (skips left out)
    agreement: float  # p_o
    kappa: float | None


@dataclass
class LabelStats:
    annotators: list[AnnotatorStats]
    agreements: list[PairAgreement] = field(default_factory=list)
    reward_model: bool = False  # whether agreement with a reward model was measured


def label_stats(labels: list[Label], scores: dict[str, tuple[float, float]] | None = None) -> LabelStats:
    """scores: candidate id -> (score of a, score of b), for agreement with a reward model."""
    by_annotator: dict[str, dict[str, Label]] = {}
    for label in labels:
        by_annotator.setdefault(label.annotator, {})[label.id] = label
    annotators = []
    for name in sorted(by_annotator):
        own = list(by_annotator[name].values())
        counts = Counter(label.choice for label in own)
        row = AnnotatorStats(name, len(own), {choice: counts.get(choice, 0) for choice in CHOICES},
                             statistics.median(label.seconds for label in own))
        if scores is not None:
            verdicts = [_rm_agrees(label.choice, *scores[label.id]) for label in own
                        if label.choice in ("a", "b") and label.id in scores]
            row.reward_model_pairs = len(verdicts)
            row.reward_model_agreement = sum(verdicts) / len(verdicts) if verdicts else None
        annotators.append(row)
    agreements = []
    for first, second in combinations(sorted(by_annotator), 2):
        shared = [id for id, label in by_annotator[first].items() if label.choice in JUDGEMENTS
                  and id in by_annotator[second] and by_annotator[second][id].choice in JUDGEMENTS]
        if not shared:
            continue
        x = [by_annotator[first][id].choice for id in shared]
        y = [by_annotator[second][id].choice for id in shared]
        agreements.append(PairAgreement(first, second, len(shared), sum(a == b for a, b in zip(x, y)) / len(shared),
                                        cohen_kappa(x, y)))
    return LabelStats(annotators, agreements, reward_model=scores is not None)


def _rm_agrees(choice: str, score_a: float, score_b: float) -> float:
    if score_a == score_b:
        return 0.5
    return float((score_a > score_b) == (choice == "a"))


@dataclass
class _TextSamples:
    """The part of `rewards.scorer.Samples` a text-scoring reward model reads."""

    prompts: list[str]
    raw_prompts: list[str]
    texts: list[str]


def reward_model_scores(export_dir: str | Path, candidates: list[Candidate],
                        batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """(score of a, score of b) of each candidate under a reward-model export."""
    from lightrlhf.models.reward import RewardModel
    from lightrlhf.rewards.scorer import Scorer
    from lightrlhf.rewards.spec import NormalizeSpec, RewardSpec

    model = RewardModel.from_pretrained(export_dir)
    scorer = Scorer(RewardSpec(path=str(export_dir), normalize=NormalizeSpec(enabled=False)),
                    reward_model=lambda samples: model.score(samples.raw_prompts, samples.texts, batch_size))
    prompts = [c.prompt for c in candidates] * 2
    texts = [c.a for c in candidates] + [c.b for c in candidates]
    total, _ = scorer.score(_TextSamples(prompts, prompts, texts))
    n = len(candidates)
    return {c.id: (float(total[i]), float(total[n + i])) for i, c in enumerate(candidates)}


def describe(stats: LabelStats) -> str:
    """The report as a plain-text table."""
    rm = stats.reward_model
    head = ["annotator", "labels", *[c.replace("_", " ") for c in CHOICES], "median s"]
    head += ["RM agrees", "on"] if rm else []
    rows = [head]
    for a in stats.annotators:
        row = [a.name, str(a.labels), *[str(a.choices[c]) for c in CHOICES], f"{a.median_seconds:.1f}"]
        if rm:
            agree = "n/a" if a.reward_model_agreement is None else f"{a.reward_model_agreement:.3f}"
            row += [agree, str(a.reward_model_pairs)]
        rows.append(row)
    lines = _table(rows)
    if stats.agreements:
        lines.append("")
        table = [["annotators", "shared pairs", "agreement", "Cohen's kappa"]]
        for p in stats.agreements:
            kappa = "n/a" if p.kappa is None else f"{p.kappa:.3f}"
            table.append([f"{p.first} / {p.second}", str(p.shared), f"{p.agreement:.3f}", kappa])
        lines += _table(table)
    else:
        lines.append("no pair was judged by two annotators (skips aside): no agreement to report")
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(_width(row[i]) for row in rows) for i in range(len(rows[0]))]

    def pad(cell: str, width: int, left: bool) -> str:
        space = " " * (width - _width(cell))
        return cell + space if left else space + cell

    return ["  ".join(pad(cell, w, i == 0) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]


def _width(text: str) -> int:
    """Columns a terminal gives `text`: two for a wide character (Chinese 甲, full-width ，), one otherwise."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
