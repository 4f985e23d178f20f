"""Rule-based reward functions, ready to use as scorer components.

Each is `f(prompts, completions) -> list[float]`, one value per completion (see rewards/scorer.py).
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\S+")


def length_words(prompts: list[str], completions: list[str]) -> list[float]:
    """Number of whitespace-separated words: with a negative weight, a brevity pressure."""
    return [float(len(_WORD.findall(c))) for c in completions]


def length_deviation(prompts: list[str], completions: list[str], target: int = 50) -> list[float]:
    """-|words - target| / target: keeps responses near a target length."""
    return [-abs(len(_WORD.findall(c)) - target) / target for c in completions]


def contains(prompts: list[str], completions: list[str], pattern: str = "", reward: float = 1.0) -> list[float]:
    """`reward` when the completion matches the regular expression `pattern`, else 0."""
    compiled = re.compile(pattern)
    return [reward if compiled.search(c) else 0.0 for c in completions]
