"""Cleaning steps between reading examples and training on them, each switchable and counted.

`CleaningSpec` is the `data.clean` node (conf/data/clean/default.yaml). In stream order:

  unicode         NFKC (or NFC) normalisation: full-width letters and digits, ligatures and compatibility
                  characters become their plain equivalents, so equal text compares equal (full-width
                  punctuation stays: it is how Chinese is written)
  control_chars   control and invisible format characters are removed (NUL, escape codes, zero-width
                  spaces, a BOM inside the text); newline and tab stay
  whitespace      line ends become "\\n", trailing spaces go, runs of blank lines become one, runs of
                  spaces inside a line become one (indentation stays: it is code's syntax), and the
                  text is stripped
  drop_duplicates an example whose prompt and response(s) equal an earlier one's ("duplicate"); with
                  annotator ids, the same annotator's: two annotators' labels of one pair are two labels
  token limits    a prompt longer than max_prompt_tokens ("prompt_too_long"), a response longer than
                  max_response_tokens ("response_too_long") or shorter than min_response_tokens
                  ("response_too_short"), counted in the model's tokens
  near_identical_pairs  preference pairs whose two responses are near-identical ("near_identical_pair"):
                  estimated Jaccard similarity of their character shingles >= near_identical_threshold
  near_duplicates an example whose prompt and responses near-duplicate an earlier one's
                  ("near_duplicate"; MinHash LSH, `lightrlhf.data.minhash`)

The text steps count the rows they changed (`LoadReport.cleaned`); the others drop rows and count
them with the loader's own reasons (`LoadReport.dropped`). The loaders keep streaming: the
per-row steps see one example at a time, the batched ones (token limits, near-identical pairs,
near-duplicates) a batch of `BATCH` examples. What stays in memory is one fingerprint a row for
exact de-duplication (a Python int in a set, ~60 bytes) and, with near-duplicates on (or measured),
what `NearDuplicateIndex` keeps (~240 bytes a row).

Exact repeats are always counted: with drop_duplicates off they go to `LoadReport.flagged` (a hash a
row costs next to nothing). `measure_all` (the data report) also runs the MinHash detectors of the
switched-off steps and counts what they would drop in `LoadReport.flagged`, without dropping it; a
stage does not (MinHash of every row would add seconds to each stage start).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lightrlhf.data.messages import Drop, Prompt
from lightrlhf.data.minhash import NearDuplicateIndex, signatures, similarity
from lightrlhf.validation import in_range, one_of, positive, require

BATCH = 4096  # examples hashed together: large enough for numpy to pay off, small enough to stream
CountTokens = Callable[[list[str]], list[int]]
_CONTROL = re.compile(  # Cc but tab/newline/CR, and the invisible Cf characters that only break matching
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\ufff9-\ufffb]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# detail: with the ellipsis U+2026, which NFKC spells "..." and Chinese writes twice as its 省略号 "……"
_FULLWIDTH_PUNCTUATION = re.compile("([\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2026])")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t\u00a0\u3000]{2,}|(?<=\S)[\t\u00a0\u3000]")
_TRAILING = re.compile(r"[ \t\u00a0\u3000]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleaningSpec:
    """Which cleaning steps run (see the module docstring); defaults are conf/data/clean/default.yaml."""

    unicode: str | None = "NFKC"
    control_chars: bool = True
    whitespace: bool = True
    drop_duplicates: bool = True
    near_duplicates: bool = False
    near_duplicate_threshold: float = 0.85
    near_identical_pairs: bool = False
    near_identical_threshold: float = 0.9
    max_prompt_tokens: int | None = None
    max_response_tokens: int | None = None
    min_response_tokens: int | None = None
    num_perm: int = 64
    shingle_size: int = 5

    def __post_init__(self) -> None:
        one_of("unicode", self.unicode, ["NFKC", "NFC", None])
        in_range("near_duplicate_threshold", self.near_duplicate_threshold, 0.0, 1.0)
        in_range("near_identical_threshold", self.near_identical_threshold, 0.0, 1.0)
        for name in ("max_prompt_tokens", "max_response_tokens", "min_response_tokens"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        require(self.num_perm >= 8 and self.num_perm & (self.num_perm - 1) == 0, "num_perm",
                f"must be a power of two >= 8 (one-permutation hashing splits the hash into bins), got {self.num_perm}")
        positive("shingle_size", self.shingle_size)

    @property
    def token_limits(self) -> bool:
        return any(v is not None for v in (self.max_prompt_tokens, self.max_response_tokens, self.min_response_tokens))


def normalize_text(text: str, spec: CleaningSpec, changed: Counter | set | None = None) -> str:
    """`text` after the text steps that `spec` switches on; each step that changed it is added to `changed`."""
    if text.isascii() and text.isprintable() and "  " not in text and text.strip() == text:
        return text  # detail: no step changes printable ASCII without tabs, line ends or runs of spaces
    for step, apply in _text_steps(spec):
        cleaned = apply(text)
        if cleaned != text and isinstance(changed, set):
            changed.add(step)
        elif cleaned != text and changed is not None:
            changed[step] += 1
        text = cleaned
    return text


@functools.lru_cache(maxsize=16)
def _text_steps(spec: CleaningSpec) -> tuple[tuple[str, Callable[[str], str]], ...]:
    steps = []
    if spec.unicode:
        steps.append(("unicode", functools.partial(_normalize_unicode, form=spec.unicode)))
    if spec.control_chars:
        steps.append(("control_chars", _remove_control))
    if spec.whitespace:
        steps.append(("whitespace", _normalize_whitespace))
    return tuple(steps)


def _remove_control(text: str) -> str:
    if text.isascii() and text.isprintable():
        return text  # detail: the common case, without a regex
    return _SURROGATE.sub("", _CONTROL.sub("", text))


def _normalize_unicode(text: str, form: str) -> str:
    """`form` normalisation, except that full-width punctuation stays (NFKC would turn Chinese "，？！：" into
    ASCII and "……" into "......", and a model trained on that writes Chinese with ASCII punctuation);
    full-width letters and digits are still folded."""
    if text.isascii():
        return text
    if form != "NFKC" or not _FULLWIDTH_PUNCTUATION.search(text):
        return unicodedata.normalize(form, text)
    pieces = _FULLWIDTH_PUNCTUATION.split(text)  # odd pieces are the punctuation itself
    return "".join(p if i % 2 else unicodedata.normalize(form, p) for i, p in enumerate(pieces))


def _normalize_whitespace(text: str) -> str:
    if text.isascii() and "  " not in text and "\t" not in text and "\r" not in text and "\n\n\n" not in text \
            and text == text.strip() and " \n" not in text:
        return text  # detail: the common case, checked without a regex
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", text)
    text = _INNER_SPACES.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string: raw text as is, a conversation as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def prompt_contents(prompt: Prompt) -> str:
    """What a prompt's author wrote: the text, or the messages' contents (no roles, no template)."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def responses(example: Any) -> tuple[str, ...]:
    """The response texts of an example: (completion,), (chosen, rejected) or ()."""
    if hasattr(example, "chosen"):
        return example.chosen, example.rejected
    if hasattr(example, "completion"):
        return (example.completion,)
    return ()


def digest(*texts: str) -> int:
    """A 64-bit fingerprint of several texts, compared only within one process (Python's own string
    hash, salted per process, is cached on each string: a second fingerprint of it costs nothing)."""
    return hash(texts)


class Cleaner:
    """The cleaning steps of one `CleaningSpec` applied to one stream of examples.

    `count_tokens` (a batch of texts -> their lengths in the model's tokens) is needed only for the
    token limits. Counts go to the `cleaned`, `dropped` and `flagged` Counters given (a LoadReport's)."""

    def __init__(self, spec: CleaningSpec, count_tokens: CountTokens | None = None, measure_all: bool = False,
                 strict: bool = False):
        if spec.token_limits and count_tokens is None:
            raise ValueError("token limits need a tokenizer to count with")
        self.spec, self.count_tokens, self.measure_all = spec, count_tokens, measure_all
        # strict mode stops at the first duplicate, and its message names the original; otherwise 8 bytes a row
        self.seen: dict[int, str] | set[int] = {} if strict else set()
        self.index: NearDuplicateIndex | None = None
        if spec.near_duplicates or measure_all:
            self.index = NearDuplicateIndex(spec.near_duplicate_threshold, spec.num_perm)

    def normalize(self, example: Any, changed: Counter) -> Any:
        """The example with every text normalised (`changed[step]` counts the rows each step changed)."""
        spec = self.spec
        if not _text_steps(spec):
            return example
        row_changed: set[str] = set()

        def clean(text: str) -> str:
            return normalize_text(text, spec, row_changed)

        prompt = example.prompt
        prompt = clean(prompt) if isinstance(prompt, str) else [{**m, "content": clean(m["content"])} for m in prompt]
        fields: dict[str, Any] = {"prompt": prompt}
        for name in ("completion", "chosen", "rejected"):
            if hasattr(example, name):
                fields[name] = clean(getattr(example, name))
        if not row_changed:
            return example
        changed.update(row_changed)
        return replace(example, **fields)

    def check_duplicate(self, example: Any, flagged: Counter) -> None:
        """Raise Drop("duplicate") for an exact repeat of an earlier example's prompt and responses."""
        key = digest(prompt_text(example.prompt), *responses(example), getattr(example, "annotator", None) or "")
        if key in self.seen:
            if not self.spec.drop_duplicates:
                flagged["duplicate"] += 1
                return
            first = f" at {self.seen[key]}" if isinstance(self.seen, dict) else ""
            raise Drop("duplicate", f"a duplicate of the example{first}")
        if isinstance(self.seen, dict):
            self.seen[key] = example.where
        else:
            self.seen.add(key)

    @property
    def batched(self) -> bool:
        return self.index is not None or self.spec.token_limits or self.spec.near_identical_pairs

    def filter(self, examples: Iterator[Any], reject: Callable[[Any, Drop], None], flagged: Counter) -> Iterator[Any]:
        """The examples that pass the batched steps; `reject(example, drop)` handles each that does not."""
        if not self.batched:
            yield from examples
            return
        batch: list[Any] = []
        for example in examples:
            batch.append(example)
            if len(batch) == BATCH:
                yield from self._filter_batch(batch, reject, flagged)
                batch = []
        if batch:
            yield from self._filter_batch(batch, reject, flagged)

    def _filter_batch(self, batch: list[Any], reject: Callable[[Any, Drop], None], flagged: Counter) -> list[Any]:
        spec, n = self.spec, len(batch)
        drops: list[Drop | None] = [None] * n
        if spec.token_limits:
            for i, drop in enumerate(self._token_limit_drops(batch)):
                drops[i] = drops[i] or drop
        pairs = hasattr(batch[0], "chosen") and (spec.near_identical_pairs or self.measure_all)
        if not pairs and self.index is None:
            return self._emit(batch, drops, reject)
        # one signature per part (prompt, each response); a row's is their bin-wise minimum
        parts = [[prompt_text(e.prompt) for e in batch]] + [list(c) for c in zip(*(responses(e) for e in batch))]
        sparse = signatures([t for part in parts for t in part], spec.num_perm, spec.shingle_size)
        sparse = sparse.reshape(len(parts), n, spec.num_perm)
        if pairs:
            close = similarity(sparse[1], sparse[2]) >= spec.near_identical_threshold
            for i in np.flatnonzero(close):
                if not spec.near_identical_pairs:
                    flagged["near_identical_pair"] += drops[i] is None
                    continue
                drops[i] = drops[i] or Drop("near_identical_pair", "the chosen and rejected responses are "
                                                                   f"near-identical (>= {spec.near_identical_threshold})")
        if self.index is not None:
            alive = np.array([d is None for d in drops])
            whole = sparse.min(axis=0)[alive]  # a row's shingles are the union of its parts'
            rows = np.flatnonzero(alive)
            matches = self.index.add(whole)
            first = self.index.size - len(rows)
            for row, match in zip(rows, matches):
                if match < 0:
                    continue
                if not spec.near_duplicates:
                    flagged["near_duplicate"] += 1
                    continue
                original = batch[rows[match - first]].where if match >= first else "an example of an earlier batch"
                drops[row] = Drop("near_duplicate", f"a near-duplicate of {original} "
                                                    f"(>= {spec.near_duplicate_threshold})")
        return self._emit(batch, drops, reject)

    @staticmethod
    def _emit(batch: list[Any], drops: list[Drop | None], reject: Callable[[Any, Drop], None]) -> list[Any]:
        kept = []
        for example, drop in zip(batch, drops):
            if drop is None:
                kept.append(example)
            else:
                reject(example, drop)
        return kept

    def _token_limit_drops(self, batch: Sequence[Any]) -> list[Drop | None]:
        spec = self.spec
        prompts = self.count_tokens([prompt_contents(e.prompt) for e in batch])
        answers = list(zip(*(responses(e) for e in batch)))
        lengths = [self.count_tokens(list(column)) for column in answers]
        drops: list[Drop | None] = []
        for i, prompt_length in enumerate(prompts):
            response_lengths = [column[i] for column in lengths]
            if spec.max_prompt_tokens is not None and prompt_length > spec.max_prompt_tokens:
                drops.append(Drop("prompt_too_long", f"the prompt has {prompt_length} tokens, more than "
                                                     f"data.clean.max_prompt_tokens={spec.max_prompt_tokens}"))
            elif spec.max_response_tokens is not None and max(response_lengths, default=0) > spec.max_response_tokens:
                drops.append(Drop("response_too_long", f"a response has {max(response_lengths)} tokens, more than "
                                                       f"data.clean.max_response_tokens={spec.max_response_tokens}"))
            elif spec.min_response_tokens is not None and response_lengths \
                    and min(response_lengths) < spec.min_response_tokens:
                drops.append(Drop("response_too_short", f"a response has {min(response_lengths)} tokens, fewer than "
                                                         f"data.clean.min_response_tokens={spec.min_response_tokens}"))
            else:
                drops.append(None)
        return drops
