"""The demo task's corpora, generated deterministically from a seed.

Three populations of writers answer the same kind of prompts:

- *pretraining* (the "web"): writers of every quality plus some word salad. The tiny base model is
  trained on this, so it knows the language and the prompt/answer shape but not what is good.
- *demonstrations* (SFT data): a better but still mixed population, the way human demonstrations
  vary in care. SFT lands near their average gold score; the spread leaves headroom for RLHF.
- *comparisons* (preference data): two demonstrations for one prompt, labelled by the simulated
  annotator, as in InstructGPT where labellers rank samples of the SFT distribution.

Train and validation prompts are disjoint: a prompt's split is fixed by a CRC of its text.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

from lightrlhf.demo.annotator import TIE, Annotator
from lightrlhf.demo.language import (
    CONTENT_WORDS,
    FUNCTION_WORDS,
    POLITE_WORDS,
    RUDE_WORDS,
    Prompt,
    ResponseStyle,
    sample_prompt,
    sample_style,
    write_response,
)
from lightrlhf.demo.language_zh import GREETINGS, to_chinese

VALIDATION_SHARE = 10  # one prompt in ten belongs to the validation split


def split_of(prompt: Prompt) -> str:
    return "validation" if zlib.crc32(prompt.text.encode()) % VALIDATION_SHARE == 0 else "train"


def prompts(rng: random.Random, split: str) -> Iterator[Prompt]:
    while True:
        prompt = sample_prompt(rng)
        if split_of(prompt) == split:
            yield prompt


def demonstrator_style(rng: random.Random) -> ResponseStyle:
    """A careful-ish human demonstrator: mostly on topic and polite, of varying diligence."""
    return ResponseStyle(
        on_topic=rng.uniform(0.35, 0.95), polite=rng.uniform(0.1, 0.55), rude=rng.uniform(0.0, 0.25),
        length_noise=rng.uniform(1.0, 4.0), ignore_request=rng.uniform(0.0, 0.4),
        full_stop=rng.uniform(0.5, 1.0), repeat=rng.uniform(0.0, 0.25),
    )


def word_salad(rng: random.Random) -> str:
    pool = CONTENT_WORDS + FUNCTION_WORDS + POLITE_WORDS + RUDE_WORDS
    return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 18)))


def pretraining_texts(n: int, seed: int, language: str = "en") -> list[tuple[str, str]]:
    """(prompt, response) pairs from the whole population of writers, 10% word salad.

    In Chinese (`language_zh`) the same pairs are translated, and one text in fifty is an everyday
    greeting (as a response to nothing: the prompt is empty) so that the model knows `你好，世界！`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = sample_prompt(rng)
        response = word_salad(rng) if rng.random() < 0.1 else write_response(prompt, sample_style(rng), rng)
        out.append((prompt.text, response))
    if language == "zh":
        greetings = random.Random(f"greetings-{seed}")
        out = [("", greetings.choice(GREETINGS)) if greetings.random() < 0.02 else (to_chinese(p), to_chinese(r))
               for p, r in out]
    return out


def sft_rows(n: int, split: str, seed: int) -> list[dict]:
    rng = random.Random(f"sft-{split}-{seed}")
    source = prompts(rng, split)
    rows = []
    for _ in range(n):
        prompt = next(source)
        rows.append({"prompt": prompt.text, "completion": write_response(prompt, demonstrator_style(rng), rng)})
    return rows


def judged_pairs(split: str, seed: int, annotator: Annotator) -> Iterator[tuple[str, str, str, str]]:
    """(prompt, a, b, verdict) without end: two demonstrations for one prompt, judged by `annotator`.

    a and b are drawn independently from the same demonstrators, so the first-shown answer is no
    better on average: an annotator's position bias is not confounded with quality."""
    rng = random.Random(f"pref-{split}-{seed}")
    source = prompts(rng, split)
    while True:
        prompt = next(source)
        a = write_response(prompt, demonstrator_style(rng), rng)
        b = write_response(prompt, demonstrator_style(rng), rng)
        if a == b:
            continue
        yield prompt.text, a, b, annotator.label(prompt.text, a, b, rng)


def preference_rows(n: int, split: str, seed: int, annotator: Annotator) -> tuple[list[dict], int]:
    """n labelled pairs (ties are re-drawn and counted); returns (rows, ties)."""
    judged = judged_pairs(split, seed, annotator)
    rows, ties = [], 0
    while len(rows) < n:
        prompt, a, b, verdict = next(judged)
        if verdict == TIE:
            ties += 1
            continue
        chosen, rejected = (a, b) if verdict == "a" else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, ties


def prompt_rows(n: int, split: str, seed: int) -> list[dict]:
    rng = random.Random(f"prompts-{split}-{seed}")
    source = prompts(rng, split)
    return [{"prompt": next(source).text} for _ in range(n)]
