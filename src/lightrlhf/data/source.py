"""What a data config says: where the examples are and how to read them.

`conf/data/*.yaml` are `DataSource`s. A source names files or hub datasets, not a kind of data: the
stage decides whether to read them as SFT examples, preference pairs or prompts, so one
`data=jsonl data.train=<file>` works for every stage whose format the file holds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightrlhf.data.clean import CleaningSpec
from lightrlhf.data.formats import FORMATS
from lightrlhf.data.readers import MAX_LINE_BYTES
from lightrlhf.validation import in_range, positive, require

T = TypeVar("T")
Evaluator = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class DataSource:
    """Train (and optionally validation) data, plus how to read and check it.

    Without `validation_path`, a fixed `val_fraction` of the training examples is held out (the same
    ones on every run and every resume: the split depends only on `split_seed`).

    `evaluator`, when set, scores generated text with a task's own measure of quality (the demo's
    hidden gold score); stages log it under `eval/<evaluator.name>` and never train on it.
    """

    path: str
    max_length: int  # prompt + response tokens; no default: each data YAML states its own
    max_prompt_length: int  # prompts are cut from the left to this many tokens; likewise
    validation_path: str | None = None
    val_fraction: float = 0.05
    split_seed: int = 0
    split: str | None = None  # hub datasets: the split to read (default "train")
    validation_split: str | None = None
    format: str = "auto"  # "auto" or a format of the stage's kind (`formats.FORMATS`)
    strict: bool = False  # ties and empty responses are errors instead of being dropped and counted
    clean: CleaningSpec = field(default_factory=CleaningSpec)  # the cleaning steps (conf/data/clean/)
    margin_from_scores: bool = False  # preference data with scores: use score_chosen - score_rejected
    max_line_bytes: int = MAX_LINE_BYTES  # a longer row is refused: it bounds the memory reading takes
    evaluator: Evaluator | None = None

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "must name a data file or a hub dataset")
        in_range("val_fraction", self.val_fraction, 0.0, 0.5)
        positive("max_length", self.max_length)
        positive("max_prompt_length", self.max_prompt_length)
        require(self.max_prompt_length < self.max_length, "max_prompt_length",
                f"must be smaller than max_length ({self.max_length}), got {self.max_prompt_length}")
        positive("max_line_bytes", self.max_line_bytes)
        # the stage decides the kind (and so which formats fit); a name no kind knows is refused here,
        # where the config key is known
        known = ("auto", *dict.fromkeys(name for names in FORMATS.values() for name in names))
        require(self.format in known, "format", f"must be one of {', '.join(known)}; got {self.format!r}")

    def options(self) -> dict[str, Any]:
        return {"format": self.format, "strict": self.strict, "clean": self.clean,
                "max_line_bytes": self.max_line_bytes}

    def hold_out(self, examples: Sequence[T]) -> tuple[list[T], list[T]]:
        """(train, validation) taken from `examples` by a fixed shuffle; at least one of each."""
        if len(examples) < 2:
            return list(examples), []
        order = list(range(len(examples)))
        random.Random(self.split_seed).shuffle(order)
        n_val = min(len(examples) - 1, max(1, round(self.val_fraction * len(examples))))
        held = set(order[:n_val])
        return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])
