"""Labels -> preference pairs in TRL's format, `{"prompt", "chosen", "rejected"}` (plus the pair's "id").

That file trains a reward model as it is: `python train.py stage=rm data=jsonl data.path=prefs.jsonl`
(the "explicit" preference format of lightrlhf.data.formats).

Several annotators on one pair: the side more of them preferred is chosen. "tie", "both bad" and
"skip" say nothing about which side is better, so they abstain from that vote; a pair whose a/b
votes are level (or where nobody preferred a side) is not exported. Every such label stays in the
label file and is counted in the summary, so nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lightrlhf.errors import UserError
from lightrlhf.feedback.candidates import Candidate, read_candidates
from lightrlhf.feedback.labels import CHOICES, Label, read_label_file
from lightrlhf.io import atomic_write_text

RULE = "several annotators on a pair: the side more of them preferred (tie, both bad and skip abstain)"


@dataclass
class ExportSummary:
    labels: int = 0  # effective labels read
    annotators: int = 0
    choices: Counter = field(default_factory=Counter)  # choice -> labels
    unknown: int = 0  # labels of ids in no candidates file given
    pairs: int = 0  # pairs with at least one label
    exported: int = 0
    no_preference: int = 0  # pairs labelled only tie / both bad / skip
    split: int = 0  # pairs with as many a votes as b votes (> 0)
    torn: str | None = None

    def describe(self, out: str | Path) -> str:
        choices = ", ".join(f"{name.replace('_', ' ')} {self.choices.get(name, 0)}" for name in CHOICES)
        text = (f"wrote {self.exported} preference pairs to {out} from {self.labels} labels by {self.annotators} "
                f"annotator{'s' if self.annotators != 1 else ''} on {self.pairs} pairs ({choices}); "
                f"not exported: {self.no_preference} pairs with no a/b preference (tie, both bad or skip only), "
                f"{self.split} with level a/b votes; {RULE}")
        if self.unknown:
            text += f"; labels of ids in no candidates file given (skipped): {self.unknown}"
        if self.torn:
            text += f"; {self.torn}: a torn last line (a crash mid-write) was skipped"
        return text


def read_all_candidates(paths: Iterable[str | Path]) -> dict[str, Candidate]:
    """Candidates of several files by id (e.g. one file per round); one id must mean one pair."""
    by_id: dict[str, Candidate] = {}
    for path in paths:
        for candidate in read_candidates(path):
            seen = by_id.get(candidate.id)
            if seen is not None and (seen.prompt, seen.a, seen.b) != (candidate.prompt, candidate.a, candidate.b):
                raise UserError(f'{candidate.where}: id "{candidate.id}" names another pair at {seen.where}')
            by_id.setdefault(candidate.id, candidate)
    return by_id


def preference_rows(labels: list[Label], candidates: dict[str, Candidate]) -> tuple[list[dict], ExportSummary]:
    """The exported rows (in the candidates' order) and what was counted on the way."""
    summary = ExportSummary(labels=len(labels), annotators=len({label.annotator for label in labels}),
                            choices=Counter(label.choice for label in labels))
    votes: dict[str, Counter] = {}
    for label in labels:
        if label.id not in candidates:
            summary.unknown += 1
            continue
        votes.setdefault(label.id, Counter())[label.choice] += 1
    rows = []
    for id, candidate in candidates.items():
        if id not in votes:
            continue
        summary.pairs += 1
        a, b = votes[id]["a"], votes[id]["b"]
        if a == b:
            summary.split += a > 0
            summary.no_preference += a == 0
            continue
        chosen, rejected = (candidate.a, candidate.b) if a > b else (candidate.b, candidate.a)
        rows.append({"prompt": candidate.prompt, "chosen": chosen, "rejected": rejected, "id": id})
    summary.exported = len(rows)
    return rows, summary


def export_preferences(labels_path: str | Path, candidates_paths: Iterable[str | Path],
                       out_path: str | Path) -> ExportSummary:
    log = read_label_file(labels_path)
    candidates = read_all_candidates(candidates_paths)
    rows, summary = preference_rows(log.labels, candidates)
    summary.torn = log.torn
    if not rows:
        raise UserError(f"{labels_path}: no pair has an a/b preference (labels: {summary.labels}, pairs of the "
                        f"candidates given: {summary.pairs}); nothing was written to {out_path}")
    atomic_write_text(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return summary
