"""The demo task's synthetic language: a small word-level vocabulary, prompts and a response generator.

A prompt is four tokens, `<request> <topic word> <topic word> :`, e.g. `explain river stone :`.
The request says how long the answer should be (a *brief* request wants about 5 words, an
*elaborate* one about 12), the two topic words say what it is about. A response is a short
sentence-like run of words ending (ideally) with a full stop.

What makes a response good is decided by the hidden gold scorer (`gold.py`); this module only knows
how to *write* responses of a chosen quality. `ResponseStyle` holds the knobs a writer turns:
how often content words stay on topic, how many polite vs rude style words appear, how closely the
length follows the request, whether the full stop is there and how much the writer repeats itself.
The corpora in `corpus.py` mix styles so that there is a spread of quality to learn from.

Everything is deterministic from a `random.Random`; the vocabulary is fixed by the code below, so
the shipped tokenizer and this module cannot drift apart (a test checks it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Requests: the first three ask for a brief answer, the last three for an elaborate one.
BRIEF_REQUESTS = ("list", "briefly", "summarize")
ELABORATE_REQUESTS = ("explain", "describe", "discuss")
REQUESTS = BRIEF_REQUESTS + ELABORATE_REQUESTS
TARGET_WORDS = {**{r: 5 for r in BRIEF_REQUESTS}, **{r: 12 for r in ELABORATE_REQUESTS}}

TOPICS: dict[str, tuple[str, ...]] = {
    "water": ("river", "rain", "lake", "wave", "fish", "boat", "shore", "flow", "wet", "blue", "tide", "stream"),
    "fire": ("flame", "smoke", "heat", "ash", "spark", "burn", "coal", "glow", "warm", "red", "torch", "ember"),
    "forest": ("tree", "leaf", "root", "moss", "wood", "branch", "bark", "pine", "green", "grow", "seed", "fern"),
    "sky": ("cloud", "star", "moon", "sun", "wind", "bird", "fly", "high", "light", "dawn", "storm", "air"),
    "city": ("street", "house", "road", "car", "market", "tower", "bridge", "crowd", "busy", "wall", "door", "shop"),
    "music": ("song", "drum", "note", "voice", "dance", "rhythm", "tune", "sing", "loud", "bell", "choir", "harp"),
    "food": ("bread", "fruit", "soup", "salt", "cook", "taste", "sweet", "meal", "bake", "honey", "rice", "spice"),
    "stone": ("rock", "cave", "hill", "sand", "gem", "cliff", "hard", "grey", "dust", "iron", "peak", "clay"),
}
# Content words that belong to no topic: using them is neither on nor off topic for the gold score
# beyond diluting relevance.
GENERIC_WORDS = (
    "thing", "place", "time", "way", "part", "day", "kind", "side", "form", "line", "point", "group",
    "number", "world", "life", "name", "story", "shape", "sound", "color", "size", "hand", "eye", "home",
    "old", "new", "small", "big", "long", "short", "good", "many", "few", "every", "other", "same",
)
POLITE_WORDS = (
    "kindly", "gladly", "clearly", "gently", "truly", "warmly", "happily", "honestly",
    "wonderful", "helpful", "lovely", "careful", "bright", "calm", "fair", "thanks",
)
RUDE_WORDS = (
    "ugh", "whatever", "boring", "stupid", "lazy", "awful", "dull", "meh",
    "nonsense", "pointless", "ugly", "rude", "sloppy", "useless", "dumb", "bleh",
)
FUNCTION_WORDS = (
    "the", "a", "is", "are", "and", "of", "with", "in", "to", "it", "that", "this",
    "on", "for", "by", "as", "so", "very", "can", "has", "there", "near", "under", "over",
)
PUNCTUATION = (".", ",", ":", "!", "?")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")

TOPIC_OF: dict[str, str] = {w: t for t, words in TOPICS.items() for w in words}
CONTENT_WORDS = tuple(TOPIC_OF) + GENERIC_WORDS


def vocabulary() -> list[str]:
    """Every token of the demo tokenizer, in id order (specials first)."""
    words = [*SPECIAL_TOKENS, *PUNCTUATION, *REQUESTS, *FUNCTION_WORDS, *POLITE_WORDS, *RUDE_WORDS,
             *(w for ws in TOPICS.values() for w in ws), *GENERIC_WORDS]
    assert len(words) == len(set(words)), "a word appears in two word classes"
    return words


@dataclass(frozen=True)
class Prompt:
    request: str
    topic: str
    words: tuple[str, str]

    @property
    def text(self) -> str:
        return f"{self.request} {self.words[0]} {self.words[1]} :"

    @property
    def target_words(self) -> int:
        return TARGET_WORDS[self.request]


def parse_prompt(text: str) -> Prompt | None:
    """Recover the request and topic from a demo prompt (None if it is not one)."""
    parts = text.replace(":", " ").split()
    if len(parts) != 3 or parts[0] not in TARGET_WORDS or parts[1] not in TOPIC_OF:
        return None
    return Prompt(parts[0], TOPIC_OF[parts[1]], (parts[1], parts[2]))


def sample_prompt(rng: random.Random) -> Prompt:
    topic = rng.choice(sorted(TOPICS))
    first, second = rng.sample(TOPICS[topic], 2)
    return Prompt(rng.choice(REQUESTS), topic, (first, second))


@dataclass(frozen=True)
class ResponseStyle:
    """How a writer answers; each field is a probability or a spread, from sloppy to careful."""

    on_topic: float = 0.6  # P(a content word is from the prompt's topic)
    polite: float = 0.3  # P(a style slot holds a polite word) ...
    rude: float = 0.2  # ... or a rude one; otherwise no style word
    length_noise: float = 3.0  # std of the word count around the requested length
    ignore_request: float = 0.3  # P(the writer ignores the requested length altogether)
    full_stop: float = 0.7  # P(the response ends with ".")
    repeat: float = 0.1  # P(a content word repeats an earlier one)


def sample_style(rng: random.Random, spread: float = 1.0) -> ResponseStyle:
    """A writer drawn from a population; `spread` in [0, 1] widens it (1 = the full range)."""

    def u(low: float, high: float) -> float:
        mid = (low + high) / 2
        return rng.uniform(mid - (mid - low) * spread, mid + (high - mid) * spread)

    return ResponseStyle(
        on_topic=u(0.15, 0.95), polite=u(0.0, 0.5), rude=u(0.0, 0.4), length_noise=u(1.0, 6.0),
        ignore_request=u(0.0, 0.7), full_stop=u(0.3, 1.0), repeat=u(0.0, 0.3),
    )


MAX_RESPONSE_WORDS = 18  # + full stop + EOS stays within 20 tokens


def write_response(prompt: Prompt, style: ResponseStyle, rng: random.Random) -> str:
    """One response to `prompt` written in `style`: words separated by spaces, maybe a final '.'."""
    if rng.random() < style.ignore_request:
        n_words = rng.randint(2, MAX_RESPONSE_WORDS)
    else:
        n_words = round(rng.gauss(prompt.target_words, style.length_noise))
    n_words = max(1, min(MAX_RESPONSE_WORDS, n_words))
    topic_words = TOPICS[prompt.topic]
    words: list[str] = []
    used_content: list[str] = []
    while len(words) < n_words:
        slot = rng.random()
        if slot < 0.3:
            words.append(rng.choice(FUNCTION_WORDS))
        elif slot < 0.45:
            style_draw = rng.random()
            if style_draw < style.polite:
                words.append(rng.choice(POLITE_WORDS))
            elif style_draw < style.polite + style.rude:
                words.append(rng.choice(RUDE_WORDS))
            else:
                words.append(rng.choice(FUNCTION_WORDS))
        else:
            if used_content and rng.random() < style.repeat:
                word = rng.choice(used_content)
            elif rng.random() < style.on_topic:
                word = rng.choice(topic_words)
            elif rng.random() < 0.5:
                word = rng.choice(GENERIC_WORDS)
            else:
                word = rng.choice(TOPICS[rng.choice([t for t in TOPICS if t != prompt.topic])])
            used_content.append(word)
            words.append(word)
    if rng.random() < 0.25 and len(words) > 4:
        words.insert(rng.randint(2, len(words) - 1), ",")
    text = " ".join(words)
    return text + " ." if rng.random() < style.full_stop else text
