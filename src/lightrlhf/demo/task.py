"""The demo task as a config object: sizes, seed and annotator, and the data files they produce.

`DemoTask.materialize(kind, split)` writes the generated rows as an ordinary JSONL file (once; the
file name carries a hash of everything that shaped it) and returns its path, so the demo runs
through exactly the same loading code as a user's own data, and the files can be opened and read.
With `language: zh` the rows are the same rows written in the Chinese demo language
(`language_zh`), so the two demos are one task in two scripts.

A small `<file>.meta.json` beside each records what produced it and, for preference data, how
often the annotator agreed with the hidden gold ranking.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lightrlhf.demo.annotator import Annotator, SimulatedAnnotator
from lightrlhf.demo.corpus import preference_rows, prompt_rows, sft_rows
from lightrlhf.demo.gold import gold_score
from lightrlhf.demo.language_zh import to_chinese
from lightrlhf.io import atomic_write_text
from lightrlhf.validation import one_of, positive

GENERATOR_VERSION = 2  # bump when the language or the writers change, so cached files are rebuilt
KINDS = ("sft", "preference", "prompts")
SPLITS = ("train", "validation")
LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class DemoTask:
    cache_dir: str
    seed: int = 1234
    sft_size: int = 4000
    preference_size: int = 16000
    prompt_size: int = 4096
    validation_size: int = 512
    annotator: Annotator = field(default_factory=SimulatedAnnotator)
    language: str = "en"

    def __post_init__(self) -> None:
        one_of("language", self.language, LANGUAGES)
        for name in ("sft_size", "preference_size", "prompt_size", "validation_size"):
            positive(name, getattr(self, name))

    def size(self, kind: str, split: str) -> int:
        if split == "validation":
            return self.validation_size
        return {"sft": self.sft_size, "preference": self.preference_size, "prompts": self.prompt_size}[kind]

    def materialize(self, kind: str, split: str) -> str:
        one_of("kind", kind, KINDS)
        one_of("split", split, SPLITS)
        shape = {"version": GENERATOR_VERSION, "kind": kind, "split": split, "seed": self.seed,
                 "size": self.size(kind, split)}
        if kind == "preference":
            # what shapes the labels (not the persona's name); settings added later appear only when
            # set, so the default annotator's files keep the names they were first cached under
            shape["annotator"] = self.annotator.shape()
        if self.language != "en":
            shape["language"] = self.language  # absent for English: its cached files keep their names
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(self.cache_dir) / "demo" / f"{kind}-{split}-{digest}.jsonl"
        if not path.exists():
            self._write(path, kind, split, shape)
        return str(path)

    def _write(self, path: Path, kind: str, split: str, shape: dict) -> None:
        n = self.size(kind, split)
        meta = dict(shape)
        if kind == "sft":
            rows = sft_rows(n, split, self.seed)
        elif kind == "prompts":
            rows = prompt_rows(n, split, self.seed)
        else:
            rows, ties = preference_rows(n, split, self.seed, self.annotator)
            agree = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows)
            meta.update(ties_dropped=ties, annotator_gold_agreement=agree / len(rows))
        if self.language == "zh":
            rows = [{key: to_chinese(text) for key, text in row.items()} for row in rows]
        os.makedirs(path.parent, exist_ok=True)
        atomic_write_text(path.with_suffix(".meta.json"), json.dumps(meta, indent=1))
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def demo_file(task: DemoTask, kind: str, split: str) -> str:
    """Config target: the path of one generated demo data file."""
    return task.materialize(kind, split)
