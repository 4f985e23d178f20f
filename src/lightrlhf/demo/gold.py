"""The hidden gold scorer: what "a good response" means on the demo task.

No model ever sees this function. The policy learns only from the reward model, which learns only
from the simulated annotator's noisy pairwise labels; the gold score is how we measure whether RLHF
actually made responses better (and catches a policy that fools its reward model).

    gold = 1.0 * relevance + 0.6 * courtesy + 0.8 * length_fit + 0.4 * full_stop - 0.4 * repetition

- relevance in [-1, 1]: (on-topic - off-topic content words) / content words; generic words dilute.
- courtesy in (-1, 1): tanh((polite - rude) / 2) -- saturates, so piling up polite words stops paying.
- length_fit in [-1.5, 0]: -|words - requested| / requested.
- full_stop in {0, 1}: the response ends with ".".
- repetition in [0, 1): share of content and style words that repeat an earlier one.

The Chinese demo (`language_zh`) is the same language written in characters: its prompts and responses
are read back into English words first, so both demos share this one scorer.

The saturation and the repetition penalty are deliberately things a reward model learns only
approximately from pairs, so an over-optimised policy can raise its reward while gold falls.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lightrlhf.demo.language import (
    CONTENT_WORDS,
    POLITE_WORDS,
    RUDE_WORDS,
    TARGET_WORDS,
    TOPIC_OF,
    parse_prompt,
)
from lightrlhf.demo.language_zh import is_chinese, to_english

_WORD = re.compile(r"[^\s.,:!?]+")
_POLITE, _RUDE, _CONTENT = set(POLITE_WORDS), set(RUDE_WORDS), set(CONTENT_WORDS)
WEIGHTS = {"relevance": 1.0, "courtesy": 0.6, "length_fit": 0.8, "full_stop": 0.4, "repetition": -0.4}


@dataclass(frozen=True)
class GoldBreakdown:
    relevance: float
    courtesy: float
    length_fit: float
    full_stop: float
    repetition: float

    @property
    def total(self) -> float:
        return sum(WEIGHTS[name] * getattr(self, name) for name in WEIGHTS)


def gold_breakdown(prompt: str, response: str) -> GoldBreakdown:
    """Score one response; a prompt that is not a demo prompt gets relevance and length from nothing."""
    prompt_line = _last_line(prompt)
    if is_chinese(prompt_line) or is_chinese(response):
        prompt_line, response = to_english(prompt_line, prompt=True), to_english(response)
    parsed = parse_prompt(prompt_line)
    words = _WORD.findall(response)
    content = [w for w in words if w in _CONTENT]
    if parsed is not None and content:
        on = sum(TOPIC_OF.get(w) == parsed.topic for w in content)
        off = sum(TOPIC_OF.get(w) not in (None, parsed.topic) for w in content)
        relevance = (on - off) / len(content)
    else:
        relevance = 0.0
    polite = sum(w in _POLITE for w in words)
    rude = sum(w in _RUDE for w in words)
    courtesy = math.tanh((polite - rude) / 2)
    target = TARGET_WORDS[parsed.request] if parsed is not None else 8
    length_fit = -min(1.5, abs(len(words) - target) / target)
    full_stop = 1.0 if response.rstrip().endswith(".") else 0.0
    counted = [w for w in words if w in _CONTENT or w in _POLITE or w in _RUDE]
    repetition = (len(counted) - len(set(counted))) / len(counted) if counted else 0.0
    return GoldBreakdown(relevance, courtesy, length_fit, full_stop, repetition)


def word_count(response: str) -> int:
    """Words of a demo response in either script (a Chinese character is a word)."""
    return len(_WORD.findall(to_english(response) if is_chinese(response) else response))


def gold_score(prompt: str, response: str) -> float:
    return gold_breakdown(prompt, response).total


def _last_line(prompt: str) -> str:
    """The demo prompt inside a chat-formatted prompt is the text after the last role marker."""
    for marker in ("<|assistant|>", "<|user|>"):
        prompt = prompt.replace(marker, "\n")
    lines = [line for line in prompt.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class GoldScorer:
    """Evaluator for the stages: the mean hidden gold score of generated completions.

    A stage calls `scorer(prompts, completions)` on held-out samples and logs the result as
    `eval/gold_score`; nothing from here feeds back into training.
    """

    name = "gold_score"

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [gold_score(p, c) for p, c in zip(prompts, completions, strict=True)]
