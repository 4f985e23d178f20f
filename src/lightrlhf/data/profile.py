"""What is in a data set, measured while it streams past: the figures of the data report.

`DataProfile.add(batch)` takes examples (after cleaning) a batch at a time; `result(report)` gives the
report as a JSON-ready dict (sections below). Memory: per row, a few 8-byte fingerprints (prompt,
pair, response) and the margin; the distinct n-grams of the responses (bounded by the vocabulary);
length counts bounded by the longest text. Nothing holds a row's text except the `top` repeated
prompts (a Misra-Gries summary of `TRACKED` prompts: every prompt repeated more than rows/TRACKED
times is certain to be in it).

Prompts given as conversations are measured by their messages' contents (no template, no roles).

Sections: rows (read, kept, dropped per reason, changed per cleaning step, flagged by a switched-off
step); lengths (tokens of prompts and responses; chosen and rejected apart); diversity (distinct-1 and
distinct-2 of the responses' tokens, Li et al. 2016); duplicates; prompts (coverage); labels
(contradictory pairs, the rows' own "label" field); length_bias; margins; annotators; scripts.

Length bias. A pair is "chosen longer" when the chosen response has more tokens than the rejected
one. A classifier that sees only the two lengths and picks the longer (or, if that is worse, the
shorter) response is right on max(p, 1 - p) of the pairs, p = (longer + same/2) / pairs: the accuracy
a reward model must beat before it has learnt anything but length (Singhal et al. 2023).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightrlhf.data.clean import digest, prompt_contents, prompt_text, responses

Tokenize = Callable[[list[str]], list[list[int]]]
TRACKED = 10_000  # prompts the repeated-prompt summary follows
HISTOGRAM_BINS = 40
_SCRIPTS = {  # codepoint ranges
    "cjk": [(0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x3100, 0x31BF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
            (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF)],
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF)],
}


class _Lengths:
    """Counts of each length seen (lengths are small integers), for exact quantiles and histograms."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, np.int64)

    def add(self, lengths: np.ndarray) -> None:
        counts = np.bincount(lengths)
        if len(counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts[: len(counts)] += counts

    def summary(self) -> dict[str, Any]:
        total = int(self.counts.sum())
        if not total:
            return {"count": 0}
        values = np.arange(len(self.counts))
        cumulative = np.cumsum(self.counts)

        def quantile(q: float) -> int:
            return int(np.searchsorted(cumulative, q * total))

        width = max(1, math.ceil(len(self.counts) / HISTOGRAM_BINS))
        edges = list(range(0, len(self.counts) + width, width))
        binned = np.add.reduceat(self.counts, edges[:-1]) if len(edges) > 1 else self.counts
        return {"count": total, "mean": float((values * self.counts).sum() / total), "min": int(np.argmax(self.counts > 0)),
                "p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99), "max": len(self.counts) - 1,
                "histogram": {"edges": edges, "counts": [int(c) for c in binned]}}


class _Distinct:
    """The distinct values among many int64 codes, kept as one sorted array (merged now and then)."""

    def __init__(self) -> None:
        self.known, self.pending, self.pending_size, self.total = np.empty(0, np.int64), [], 0, 0

    def add_unique(self, codes: np.ndarray, total: int) -> None:
        """`codes`: the distinct values of `total` values."""
        self.total += total
        self.pending.append(codes)
        self.pending_size += len(self.pending[-1])
        if self.pending_size > max(1 << 20, len(self.known)):  # detail: merging seldom keeps it linear
            self._merge()

    def _merge(self) -> None:
        self.known = np.unique(np.concatenate([self.known, *self.pending]))
        self.pending, self.pending_size = [], 0

    def count(self) -> int:
        self._merge()
        return len(self.known)


class _Repeats:
    """Misra-Gries summary: the prompts that may be among the most repeated, with one text each."""

    def __init__(self, capacity: int = TRACKED) -> None:
        self.capacity, self.counts, self.texts = capacity, {}, {}

    def add(self, key: int, text: str) -> None:
        if key in self.counts:
            self.counts[key] += 1
        elif len(self.counts) < self.capacity:
            self.counts[key], self.texts[key] = 1, text
        else:
            for other in list(self.counts):
                self.counts[other] -= 1
                if not self.counts[other]:
                    del self.counts[other], self.texts[other]


class DataProfile:
    """The statistics of one split of one kind ("sft", "preference" or "prompt"); see the module docstring."""

    def __init__(self, kind: str, tokenize: Tokenize, top_prompts: int = 10, length_bias_warning: float = 0.6):
        self.kind, self.tokenize, self.top_prompts, self.length_bias_warning = kind, tokenize, top_prompts, length_bias_warning
        sides = {"sft": ["completion"], "preference": ["chosen", "rejected"], "prompt": []}[kind]
        self.sides = sides
        self.lengths = {name: _Lengths() for name in ["prompt", *sides]}
        self.unigrams, self.bigrams = _Distinct(), _Distinct()
        self.prompt_keys: list[np.ndarray] = []
        self.response_keys: list[list[np.ndarray]] = [[] for _ in sides]  # (prompt, response) fingerprints, by side
        self.pair_keys: list[np.ndarray] = []  # unordered (prompt, response, response) fingerprint ...
        self.winner_keys: list[np.ndarray] = []  # ... and the chosen one's
        self.annotator_of: list[np.ndarray] = []
        self.annotators: dict[str, int] = {}
        self.labels: Counter = Counter()
        self.repeats = _Repeats()
        self.margins: list[np.ndarray] = []
        self.longer = self.shorter = self.same = 0
        self.characters: Counter = Counter()
        self.script_rows: Counter = Counter()

    def add_all(self, examples: Iterable[Any], batch_size: int = 4096, workers: int = 0) -> None:
        """Add every example. The token statistics of a batch (`token_stats`: tokenizing, n-grams,
        scripts, the bulk of the work) are computed while the next batches are read and cleaned: by
        `workers` processes (forked, so they share the tokenizer; results are merged in batch order, so
        the figures do not depend on `workers`), or with workers=0 by a thread of this process (Rust
        tokenizers release the GIL, the rest does not). At most 2 x workers + 1 batches are in flight.
        Forking copies only the calling thread: called inside a long-lived process whose other threads
        may hold locks (a test process that ran torch), use workers=0; the report's CLI forks early."""
        if workers > 0:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, (self.tokenize,))
            submit, in_flight = lambda texts, n: pool.apply_async(_worker_token_stats, (texts, n, len(self.sides))), 2 * workers
        else:
            pool = ThreadPoolExecutor(max_workers=1)
            submit, in_flight = lambda texts, n: pool.submit(token_stats, self.tokenize, texts, n, len(self.sides)), 1
        pending: deque[tuple[list[Any], tuple, Any]] = deque()  # (batch, its texts, its token statistics to come)
        try:
            batch: list[Any] = []
            for example in itertools.chain(examples, [None]):
                if example is not None:
                    batch.append(example)
                if batch and (len(batch) == batch_size or example is None):
                    texts = self._texts(batch)
                    pending.append((batch, texts, submit(texts[-1], len(batch))))
                    batch = []
                while pending and (len(pending) > in_flight or example is None):
                    done, texts, stats = pending.popleft()
                    self._add(done, texts, stats.get() if workers > 0 else stats.result())
        finally:
            if workers > 0:
                pool.terminate()  # detail: every result was taken (or an error stops the report): nothing to wait for
            else:
                pool.shutdown(cancel_futures=True)

    def add(self, batch: list[Any]) -> None:
        texts = self._texts(batch)
        self._add(batch, texts, token_stats(self.tokenize, texts[-1], len(batch), len(self.sides)))

    @staticmethod
    def _texts(batch: list[Any]) -> tuple[list[str], list[list[str]], list[str]]:
        prompts = [prompt_text(e.prompt) for e in batch]  # roles included: they tell conversations apart
        contents = [prompt_contents(e.prompt) for e in batch]  # what was written, for lengths and scripts
        answers = [list(column) for column in zip(*(responses(e) for e in batch))]
        return prompts, answers, contents + [t for column in answers for t in column]

    def _add(self, batch: list[Any], texts: tuple, stats: TokenStats) -> None:
        prompts, answers, _ = texts
        n = len(batch)
        self.lengths["prompt"].add(stats.lengths[:n])
        side_lengths = []
        for s, name in enumerate(self.sides):
            side_lengths.append(stats.lengths[n * (s + 1): n * (s + 2)])
            self.lengths[name].add(side_lengths[-1])
            self.unigrams.add_unique(*stats.unigrams[s])
            self.bigrams.add_unique(*stats.bigrams[s])
        prompt_keys = np.fromiter((digest(p) for p in prompts), np.int64, n)
        self.prompt_keys.append(prompt_keys)
        for key, text in zip(prompt_keys.tolist(), prompts):
            self.repeats.add(key, text)
        for side, column in enumerate(answers):
            self.response_keys[side].append(np.fromiter((digest(p, r) for p, r in zip(prompts, column)), np.int64, n))
        if self.kind == "preference":
            self._pairs(batch, prompts, side_lengths)
        for example in batch:
            if getattr(example, "label", None) is not None:
                self.labels[example.label] += 1
        self.characters.update(stats.characters)
        self.script_rows.update(stats.script_rows)

    def _pairs(self, batch: list[Any], prompts: list[str], side_lengths: list[np.ndarray]) -> None:
        chosen, rejected = side_lengths
        self.longer += int((chosen > rejected).sum())
        self.shorter += int((chosen < rejected).sum())
        self.same += int((chosen == rejected).sum())
        margins = [e.margin for e in batch if e.margin is not None]
        if margins:
            self.margins.append(np.asarray(margins, np.float64))
        self.pair_keys.append(np.fromiter((digest(p, *sorted((e.chosen, e.rejected))) for p, e in zip(prompts, batch)),
                                          np.int64, len(batch)))
        self.winner_keys.append(np.fromiter((digest(e.chosen) for e in batch), np.int64, len(batch)))
        ids = [self.annotators.setdefault(e.annotator, len(self.annotators)) if e.annotator is not None else -1
               for e in batch]
        self.annotator_of.append(np.asarray(ids, np.int64))

    # -- the report ----------------------------------------------------------------------------------
    def result(self, report: Any, near_measured: Collection[str] = ("near_duplicate", "near_identical_pair")
               ) -> dict[str, Any]:
        """The report of the examples added so far; `report` is their LoadReport (complete).
        `near_measured`: the MinHash reasons the loader measured (a stage measures only the steps it runs);
        the others are left out of "duplicates" rather than shown as 0."""
        out: dict[str, Any] = {"kind": self.kind, "source": report.source, "format": report.format}
        out["rows"] = {"read": report.rows, "kept": report.kept, "dropped": dict(sorted(report.dropped.items())),
                       "cleaned": dict(sorted(report.cleaned.items())), "flagged": dict(sorted(report.flagged.items()))}
        out["lengths"] = {name: lengths.summary() for name, lengths in self.lengths.items()}
        if self.sides:
            unique_1, unique_2 = self.unigrams.count(), self.bigrams.count()
            out["diversity"] = {"distinct_1": unique_1 / max(self.unigrams.total, 1), "distinct_2":
                                unique_2 / max(self.bigrams.total, 1), "unique_unigrams": unique_1,
                                "unique_bigrams": unique_2, "unigrams": self.unigrams.total, "bigrams": self.bigrams.total}
        out["duplicates"] = self._duplicates(report, near_measured)
        out["prompts"] = self._prompts()
        if self.kind == "preference":
            out["labels"] = self._labels()
            out["length_bias"] = self._length_bias()
            out["margins"] = self._margins()
            out["annotators"] = self._annotators()
        elif self.labels:
            out["labels"] = {"field": dict(self.labels.most_common())}
        letters = self.characters["cjk"] + self.characters["latin"]
        out["scripts"] = {"characters": {k: self.characters[k] for k in ("cjk", "latin", "other")},
                          "cjk_fraction_of_letters": self.characters["cjk"] / letters if letters else 0.0,
                          "rows": {k: self.script_rows[k] for k in ("latin", "cjk", "mixed", "none")}}
        out["warnings"] = self._warnings(out)
        return out

    def _duplicates(self, report: Any, near_measured: Collection[str]) -> dict[str, Any]:
        reasons = ["duplicate", *(r for r in ("near_duplicate", "near_identical_pair") if r in near_measured)]
        if self.kind != "preference" and "near_identical_pair" in reasons:
            reasons.remove("near_identical_pair")
        found = {reason: report.dropped.get(reason, 0) + report.flagged.get(reason, 0) for reason in reasons}
        rows = max(report.rows, 1)
        return {**{("exact" if k == "duplicate" else k): v for k, v in found.items()},
                **{f"{'exact' if k == 'duplicate' else k}_rate": v / rows for k, v in found.items()}}

    def _prompts(self) -> dict[str, Any]:
        keys = np.concatenate(self.prompt_keys) if self.prompt_keys else np.empty(0, np.int64)
        unique, rows = np.unique(keys, return_counts=True)
        out = {"unique": int(len(unique)), "rows_per_prompt_mean": float(rows.mean()) if len(rows) else 0.0,
               "rows_per_prompt_max": int(rows.max()) if len(rows) else 0, "in_several_rows": int((rows > 1).sum())}
        if self.sides:
            responses_of = np.concatenate([np.concatenate(side) for side in self.response_keys])
            pairs = np.unique(np.stack([np.tile(keys, len(self.sides)), responses_of]), axis=1)
            answered = np.unique(pairs[0], return_counts=True)[1]
            out["with_several_responses"] = int((answered > 1).sum())
            out["responses_per_prompt_mean"] = float(answered.mean()) if len(answered) else 0.0
        exact = dict(zip(unique.tolist(), rows.tolist()))
        tracked = sorted(self.repeats.texts, key=lambda k: (-exact.get(k, 0), self.repeats.texts[k]))
        out["top"] = [{"prompt": self.repeats.texts[k], "rows": exact[k]} for k in tracked[: self.top_prompts]
                      if exact.get(k, 0) > 1]
        return out

    def _pair_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pairs = np.concatenate(self.pair_keys) if self.pair_keys else np.empty(0, np.int64)
        winners = np.concatenate(self.winner_keys) if self.winner_keys else np.empty(0, np.int64)
        annotators = np.concatenate(self.annotator_of) if self.annotator_of else np.empty(0, np.int64)
        return pairs, winners, annotators

    def _labels(self) -> dict[str, Any]:
        pairs, winners, _ = self._pair_groups()
        unique_pairs, group, labelled = np.unique(pairs, return_inverse=True, return_counts=True)
        distinct_winners = np.unique(np.stack([group.astype(np.int64), winners]), axis=1)[0]
        winners_per_pair = np.bincount(distinct_winners.astype(np.int64), minlength=len(unique_pairs))
        out = {"pairs_labelled_more_than_once": int((labelled > 1).sum()),
               "contradictory_pairs": int((winners_per_pair > 1).sum())}
        if self.labels:
            out["field"] = dict(self.labels.most_common())
        return out

    def _length_bias(self) -> dict[str, Any]:
        pairs = self.longer + self.shorter + self.same
        longer_wins = (self.longer + self.same / 2) / pairs if pairs else 0.5
        accuracy = max(longer_wins, 1 - longer_wins)
        return {"pairs": pairs, "chosen_longer": self.longer, "chosen_shorter": self.shorter, "same_length": self.same,
                "chosen_longer_fraction": self.longer / pairs if pairs else 0.0,
                "length_only_accuracy": accuracy, "length_only_rule": "longer" if longer_wins >= 0.5 else "shorter",
                "warning_at": self.length_bias_warning, "warning": bool(pairs and accuracy >= self.length_bias_warning)}

    def _margins(self) -> dict[str, Any]:
        values = np.concatenate(self.margins) if self.margins else np.empty(0)
        if not len(values):
            return {"present": 0}
        counts, edges = np.histogram(values, bins=min(HISTOGRAM_BINS, max(1, len(np.unique(values)))))
        return {"present": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
                "min": float(values.min()), "max": float(values.max()),
                "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}

    def _annotators(self) -> dict[str, Any]:
        pairs, winners, annotators = self._pair_groups()
        names = list(self.annotators)
        labelled = annotators >= 0
        out: dict[str, Any] = {"count": len(names), "rows": {n: int((annotators == i).sum()) for i, n in enumerate(names)}}
        if not names:
            return out
        pairs, winners, annotators = pairs[labelled], winners[labelled], annotators[labelled]
        _, group, size = np.unique(pairs, return_inverse=True, return_counts=True)
        _, side, same_side = np.unique(np.stack([group.astype(np.int64), winners]), axis=1, return_inverse=True,
                                       return_counts=True)
        side = side.ravel()
        others = size[group] - 1  # the other labels of the same pair, and how many of them agree
        agreeing = same_side[side] - 1
        shared = others > 0
        out["pairs_with_several_labels"] = int((size > 1).sum())
        # pairwise agreement: of all pairs of labels given to one comparison, the fraction that agree
        out["agreement"] = float(agreeing[shared].sum() / others[shared].sum()) if shared.any() else None
        out["agreement_per_annotator"] = {
            n: (float(agreeing[mask].sum() / others[mask].sum()) if (mask := shared & (annotators == i)).any() else None)
            for i, n in enumerate(names)}
        return out

    def _warnings(self, out: dict[str, Any]) -> list[str]:
        warnings = []
        bias = out.get("length_bias")
        if bias and bias["warning"]:
            warnings.append(f"length bias: a classifier that picks the {bias['length_only_rule']} response is right on "
                            f"{bias['length_only_accuracy']:.1%} of {bias['pairs']} pairs (chosen longer: "
                            f"{bias['chosen_longer_fraction']:.1%}); a reward model must beat that")
        duplicates = out["duplicates"]
        if duplicates.get("near_duplicate_rate", 0) >= 0.05:
            warnings.append(f"near-duplicates: {duplicates['near_duplicate_rate']:.1%} of the rows")
        if out.get("labels", {}).get("contradictory_pairs"):
            warnings.append(f"label noise: {out['labels']['contradictory_pairs']} pairs are labelled both ways")
        agreement = out.get("annotators", {}).get("agreement")
        if agreement is not None and agreement < 0.7:
            warnings.append(f"annotators agree on {agreement:.1%} of the label pairs they share")
        return warnings



@dataclass
class TokenStats:
    """What a batch of texts (prompt contents, then each side's responses, n each) adds to a profile,
    computed away from it (a worker process) and merged in order."""

    lengths: np.ndarray  # tokens of each text
    unigrams: list[tuple[np.ndarray, int]]  # by side: the distinct unigram codes, and how many unigrams
    bigrams: list[tuple[np.ndarray, int]]  # by side: likewise for bigrams
    characters: Counter  # script -> characters
    script_rows: Counter  # a row's script -> rows


def token_stats(tokenize: Tokenize, texts: list[str], n: int, sides: int) -> TokenStats:
    distinct = list(dict.fromkeys(texts))  # detail: a prompt with several responses is tokenized once
    ids_of = dict(zip(distinct, tokenize(distinct)))
    ids = [ids_of[text] for text in texts]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    unigrams, bigrams = [], []
    for s in range(sides):
        side_lengths = lengths[n * (s + 1): n * (s + 2)]
        flat = np.fromiter(itertools.chain.from_iterable(ids[n * (s + 1): n * (s + 2)]), np.int64,
                           int(side_lengths.sum()))
        ends = np.cumsum(side_lengths)
        inside = np.ones(max(len(flat) - 1, 0), bool)
        inside[(ends - 1)[(ends - 1) < len(inside)]] = False  # a bigram does not cross two responses
        pairs = (flat[:-1] << 32 | flat[1:])[inside] if len(flat) > 1 else flat[:0]
        unigrams.append((np.unique(flat), len(flat)))
        bigrams.append((np.unique(pairs), len(pairs)))
    rows = [" ".join(texts[i::n]) for i in range(n)]  # a row's prompt and responses
    characters, script_rows = _scripts(rows)
    return TokenStats(lengths, unigrams, bigrams, characters, script_rows)


_worker_tokenize: Tokenize | None = None


def _start_worker(tokenize: Tokenize) -> None:
    global _worker_tokenize
    _worker_tokenize = tokenize
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a worker: the workers are the parallelism


def _worker_token_stats(texts: list[str], n: int, sides: int) -> TokenStats:
    return token_stats(_worker_tokenize, texts, n, sides)


def _scripts(texts: list[str]) -> tuple[Counter, Counter]:
    lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
    points = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    per_row, in_scripts, characters, script_rows = {}, 0, Counter(), Counter()
    for script, ranges in _SCRIPTS.items():
        inside = np.zeros(len(points), bool)
        for low, high in ranges:
            inside |= (points >= low) & (points <= high)
        per_row[script] = np.add.reduceat(inside, starts) if len(points) else np.zeros(len(texts), np.int64)
        per_row[script] = np.where(lengths > 0, per_row[script], 0)
        characters[script] += int(inside.sum())
        in_scripts += int(inside.sum())
    spaces = int(((points == 32) | (points == 10) | (points == 9)).sum())
    characters["other"] += len(points) - spaces - in_scripts  # digits, punctuation, other scripts
    cjk, latin = per_row["cjk"], per_row["latin"]
    letters = cjk + latin
    minority = np.minimum(cjk, latin)
    mixed = (letters > 0) & (minority >= 0.1 * letters)
    script_rows["mixed"] += int(mixed.sum())
    script_rows["cjk"] += int((~mixed & (cjk > latin)).sum())
    script_rows["latin"] += int((~mixed & (latin > cjk)).sum())
    script_rows["none"] += int((letters == 0).sum())
    return characters, script_rows


def summary_scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """The report's headline numbers as flat `prefix/section/name` scalars (for TensorBoard and metrics.json)."""
    flat: dict[str, float] = {}
    for section in ("diversity", "duplicates", "length_bias", "margins", "annotators", "labels"):
        for name, value in (result.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{section}/{name}"] = value
    for name, lengths in result["lengths"].items():
        for stat in ("mean", "p50", "p90", "max"):
            if stat in lengths:
                flat[f"{prefix}/lengths/{name}_{stat}"] = lengths[stat]
    for name in ("unique", "in_several_rows", "with_several_responses", "rows_per_prompt_mean"):
        if name in result["prompts"]:
            flat[f"{prefix}/prompts/{name}"] = result["prompts"][name]
    flat[f"{prefix}/scripts/cjk_fraction_of_letters"] = result["scripts"]["cjk_fraction_of_letters"]
    return flat


