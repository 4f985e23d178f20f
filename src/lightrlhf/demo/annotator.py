"""A simulated annotator that labels response pairs by a Bradley-Terry draw on the gold score.

    P(A preferred over B) = sigmoid(rationality * (gold_A - gold_B) + length_bias * (words_A - words_B))

`rationality` is the inverse temperature of the choice (Bradley & Terry 1952; the Boltzmann-rational
model of Christiano et al. 2017): 0 is a coin flip, large values always pick the better answer.
`length_bias` adds a preference per extra word that has nothing to do with quality, the way human
raters favour longer answers (Singhal et al. 2023, "A Long Way to Go"); switch it on to provoke
length hacking in PPO. `tie_rate` is the chance of answering "tie" for two equally good answers; it
decays with the gold gap as exp(-rationality * |gold_A - gold_B|).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lightrlhf.demo.gold import gold_score, word_count
from lightrlhf.validation import in_range, non_negative

A_BETTER, B_BETTER, TIE = "a", "b", "tie"


@dataclass(frozen=True)
class SimulatedAnnotator:
    rationality: float = 5.0
    length_bias: float = 0.0
    tie_rate: float = 0.0

    def __post_init__(self) -> None:
        non_negative("rationality", self.rationality)
        in_range("tie_rate", self.tie_rate, 0.0, 1.0)

    def preference_probability(self, prompt: str, a: str, b: str) -> float:
        """P(a is preferred over b) under the annotator's Bradley-Terry model."""
        logit = self.rationality * (gold_score(prompt, a) - gold_score(prompt, b))
        logit += self.length_bias * (word_count(a) - word_count(b))
        return 1.0 / (1.0 + math.exp(-logit))

    def label(self, prompt: str, a: str, b: str, rng: random.Random) -> str:
        """One noisy judgement: "a", "b" or "tie"."""
        gap = abs(gold_score(prompt, a) - gold_score(prompt, b))
        if rng.random() < self.tie_rate * math.exp(-self.rationality * gap):
            return TIE
        return A_BETTER if rng.random() < self.preference_probability(prompt, a, b) else B_BETTER
