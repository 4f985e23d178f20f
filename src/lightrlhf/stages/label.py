"""Labels for a candidates file, given through the labelling server's HTTP API (lightrlhf.feedback).

A stage that trains nothing (`stage=label`, the `SamplingStage` contract). It serves
`stage.candidates` with the label file `<run dir>/labels.jsonl`, and then

- `labeler: simulated` (the demo): the demo's simulated annotator (demo/annotator.py, Bradley-Terry
  on the hidden gold score) asks the server for its next pair, judges it and posts the choice --
  the very requests the page makes for a person, so the loop a person runs is the loop the demo
  and the tests run;
- `labeler: person`: the page is served on `host:port` and the stage waits until every pair has a
  label from someone (any annotator name), then goes on.

Then the labels become preference pairs {prompt, chosen, rejected, id} (feedback/export.py: ties,
"both bad" and skips stay in the label file and are counted, not exported): this round's in
`round_prefs.jsonl`, and in `prefs.jsonl` those of `previous` (the label step of the round before,
itself cumulative) followed by this round's -- all labels so far, what the next reward model
trains on.

Nothing is lost or given twice across a kill. Each label is on disk (fsync) before the server
answers; a relaunch asks the server for the first pair this annotator has not labelled and goes on
from there; a label the server already holds is answered 409, which counts as saved (a retried
request whose first answer was lost). The simulated annotator's judgement of a pair depends on
(seed, candidate id) alone, so a run killed and resumed labels exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from lightrlhf.errors import ConfigError, UserError
from lightrlhf.io import atomic_write_text
from lightrlhf.validation import non_negative, one_of, positive

log = logging.getLogger(__name__)
LABELS_FILE, ROUND_PREFS_FILE, PREFS_FILE = "labels.jsonl", "round_prefs.jsonl", "prefs.jsonl"


class LabelPairs:
    """See module docstring. `name`: the annotator name the simulated annotator labels under;
    `seed`: its judgements' seed; `pace_s`: seconds it takes per label (0: as fast as the server
    answers; a person's pace for a demo of the page); `token`: required by the server on any
    address but 127.0.0.1."""

    resumable = True  # a relaunch continues the label file (module docstring)

    def __init__(self, candidates: str, labeler: Literal["simulated", "person"] = "simulated", annotator=None,
                 name: str = "simulated", seed: int = 0, previous: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None, poll_s: float = 2.0, pace_s: float = 0.0):
        one_of("labeler", labeler, ("simulated", "person"))
        if labeler == "simulated" and annotator is None:
            raise ConfigError("stage.annotator", "labeler=simulated needs an annotator (the demo's: ${demo.annotator})")
        if not str(name).strip():
            raise ConfigError("stage.name", "must be a non-empty annotator name")
        non_negative("port", port)
        positive("poll_s", poll_s)
        non_negative("pace_s", pace_s)
        if not Path(candidates).is_file():
            raise ConfigError("stage.candidates", f"{candidates} is not a file (a candidates.jsonl of stage=sample_pairs)")
        if previous is not None and not (Path(previous) / PREFS_FILE).is_file():
            raise ConfigError("stage.previous", f"{previous} holds no {PREFS_FILE} (the run directory of an earlier "
                                                "stage=label)")
        self.candidates, self.labeler, self.annotator, self.name = candidates, labeler, annotator, str(name).strip()
        self.seed, self.previous, self.host, self.port, self.token, self.poll_s = seed, previous, host, port, token, poll_s
        self.pace_s = pace_s
        self.default_metric = "labels/total_pairs"

    # -- labelling ---------------------------------------------------------------------------------
    def label_simulated(self, url: str) -> int:
        """The simulated annotator labels every pair it has not labelled yet; returns how many it posted."""
        from lightrlhf.feedback.client import FeedbackClient, FeedbackError

        client, posted = FeedbackClient(url, token=self.token), 0
        while True:
            answer = client.next(self.name)
            if answer["done"] or answer["candidate"] is None:
                return posted
            pair = answer["candidate"]
            judge = random.Random(f"{self.seed}:{pair['id']}")  # the same judgement whatever was labelled before
            choice = self.annotator.label(pair["prompt"], pair["a"], pair["b"], judge)
            time.sleep(self.pace_s)
            try:
                client.label(pair["id"], self.name, choice, seconds=self.pace_s)
            except FeedbackError as error:
                if error.status != 409:  # 409: already on disk (the answer to an earlier try was lost)
                    raise UserError(f"labelling server at {url}: {error.message}") from None
            posted += 1

    def wait_for_person(self, labels_path: Path, ids: set[str], url: str) -> None:
        from lightrlhf.feedback.labels import read_labels

        log.info("label: open %s/%s and label the %d pairs; this step goes on when every pair has a label", url,
                 f"?token={self.token}" if self.token else "", len(ids))
        while True:
            done = {label.id for label in read_labels(labels_path)} & ids
            if len(done) == len(ids):
                return
            time.sleep(self.poll_s)

    # -- export ------------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, float]:
        from lightrlhf.feedback.export import preference_rows, read_all_candidates
        from lightrlhf.feedback.labels import read_label_file

        candidates = read_all_candidates([self.candidates])
        labels = read_label_file(out_dir / LABELS_FILE).labels
        rows, summary = preference_rows(labels, candidates)
        earlier = []
        if self.previous is not None:
            earlier = [json.loads(line) for line in (Path(self.previous) / PREFS_FILE).read_text(encoding="utf-8").splitlines() if line]
            seen = {row.get("id") for row in earlier}
            repeated = [row["id"] for row in rows if row["id"] in seen]
            if repeated:
                raise UserError(f"{self.candidates}: candidate id {repeated[0]!r} was labelled in an earlier round "
                                f"({self.previous}); give each round's candidates their own ids (stage.id_prefix)")
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(out_dir / ROUND_PREFS_FILE, text)
        atomic_write_text(out_dir / PREFS_FILE,
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in earlier) + text)
        metrics = {"labels/given": float(summary.labels), "labels/round_pairs": float(len(rows)),
                   "labels/total_pairs": float(len(earlier) + len(rows))}
        metrics.update({f"labels/{choice}": float(count) for choice, count in sorted(summary.choices.items())})
        if self.labeler == "simulated" and rows:
            from lightrlhf.demo.gold import gold_score

            agree = [gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows]
            metrics["labels/gold_agreement"] = sum(agree) / len(agree)
        return metrics

    def run(self, out_dir: Path) -> dict[str, Any]:
        """What the launcher calls: label (or wait for the labels), then export."""
        from lightrlhf.feedback.candidates import read_candidates
        from lightrlhf.feedback.server import serve_in_thread

        labels_path = out_dir / LABELS_FILE
        ids = {c.id for c in read_candidates(self.candidates)}
        started = time.perf_counter()
        with serve_in_thread(self.candidates, labels_path, host=self.host, port=self.port, token=self.token) as url:
            if self.labeler == "simulated":
                posted = self.label_simulated(url)
                log.info("label: the simulated annotator %r labelled %d pairs through %s", self.name, posted, url)
            else:
                self.wait_for_person(labels_path, ids, url)
        metrics = self.export(out_dir)
        metrics["labels/seconds"] = round(time.perf_counter() - started, 3)
        counts = Counter({k.split("/")[1]: int(v) for k, v in metrics.items() if k.split("/")[1] in
                          ("a", "b", "tie", "both_bad", "skip")})
        log.info("label: %d labels (%s); %d preference pairs in %s", int(metrics["labels/given"]),
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), int(metrics["labels/total_pairs"]),
                 out_dir / PREFS_FILE)
        return {"metrics": metrics, "labels": str(labels_path), "prefs": str(out_dir / PREFS_FILE),
                "candidates": self.candidates}
