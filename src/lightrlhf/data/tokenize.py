"""Turning normalised examples into token ids, with every truncation counted.

Prompt and response are tokenized separately and concatenated: the prompt with the tokenizer's
special tokens (its BOS) or, for a conversation, through the chat template with the generation
prompt appended; the response without special tokens, followed by EOS. This is exactly the
boundary the model sees when it generates (prompt tokens, then its own tokens), so training and
sampling agree, and a BPE merge across the boundary can never move a token between the two.

Over-long examples keep their response: the prompt is cut from the *left* (its most recent part
is the part that matters), to `max_prompt_length` and then to whatever `max_length` leaves. SFT
completions that still do not fit are cut on the right; preference responses are never cut (a
cut response is a different response than the one that was judged), so such pairs are dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from lightrlhf.data.formats import Prompt


def encode_prompt(tokenizer, prompt: Prompt, known: Pretokenized | None = None) -> list[int]:
    if isinstance(prompt, str):
        ids = known.prompts.get(prompt) if known is not None else None
        return list(tokenizer(prompt)["input_ids"] if ids is None else ids)
    # detail: the chat template already writes the BOS; tokenizing its text again with special
    # tokens would add a second one, so take the ids straight from the template.
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """The ids of each text alone (by default without special tokens), a batch at once: the ids
    `tokenizer(text, add_special_tokens=...)` gives, at a fraction of the cost."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # detail: the Rust tokenizer directly; the Python wrapper costs ~60 us a text. A backend left with
    # truncation or padding switched on would not give the wrapper's ids: then the wrapper it is.
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers>=0.21)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


@dataclass
class Pretokenized:
    """Token ids of many texts, computed a batch at a time and looked up by text, so that a data module
    tokenizes each text once for its features and its data summary alike."""

    texts: dict[str, list[int]]  # responses and prompt contents, without special tokens
    prompts: dict[str, list[int]]  # prompts given as text, with the tokenizer's special tokens (as encode_prompt)

    @classmethod
    def of(cls, tokenizer, texts: list[str], prompts: list[str]) -> Pretokenized:
        texts, prompts = list(dict.fromkeys(texts)), list(dict.fromkeys(prompts))
        return cls(dict(zip(texts, token_ids(tokenizer, texts))),
                   dict(zip(prompts, token_ids(tokenizer, prompts, add_special_tokens=True))))

    def lookup(self, tokenizer) -> Callable[[list[str]], list[list[int]]]:
        """`token_ids` for texts that are mostly known: only the unknown ones are tokenized."""
        def ids_of(texts: list[str]) -> list[list[int]]:
            missing = [t for t in dict.fromkeys(texts) if t not in self.texts]
            found = dict(zip(missing, token_ids(tokenizer, missing)))
            return [self.texts[t] if t in self.texts else found[t] for t in texts]
        return ids_of


def token_counter(tokenizer):
    """A batch of texts -> their lengths in tokens (for data.clean's token limits)."""
    return lambda texts: [len(ids) for ids in token_ids(tokenizer, texts)]


def encode_response(tokenizer, text: str, known: Pretokenized | None = None) -> list[int]:
    ids = known.texts.get(text) if known is not None else None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"] if ids is None else ids) + [tokenizer.eos_token_id]


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model reads it (template applied), for logs and text-based scorers."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@dataclass
class TruncationReport:
    examples: int = 0
    counts: Counter = field(default_factory=Counter)

    def note(self, what: str) -> None:
        self.counts[what] += 1

    def as_dict(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/{k}": v for k, v in sorted(self.counts.items())}


def fit_prompt(prompt_ids: list[int], budget: int, report: TruncationReport) -> list[int]:
    if len(prompt_ids) > budget:
        report.note("prompt_truncated")
        return prompt_ids[len(prompt_ids) - budget:] if budget > 0 else []
    return prompt_ids


@dataclass(frozen=True)
class SFTFeatures:
    input_ids: list[int]
    prompt_length: int


def encode_sft(tokenizer, prompt: Prompt, completion: str, max_length: int, max_prompt_length: int,
               report: TruncationReport, known: Pretokenized | None = None) -> SFTFeatures | None:
    """known: ids already computed for these texts (the same ids, tokenized once)."""
    report.examples += 1
    prompt_ids = fit_prompt(encode_prompt(tokenizer, prompt, known), max_prompt_length, report)
    response_ids = encode_response(tokenizer, completion, known)
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        report.note("completion_truncated")
        response_ids = response_ids[:room]
    if not response_ids:
        report.note("dropped_no_room")
        return None
    return SFTFeatures(prompt_ids + response_ids, len(prompt_ids))


@dataclass(frozen=True)
class PairFeatures:
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_prompt_length: int
    rejected_prompt_length: int
    margin: float
    index: int = -1  # position of the example in its split (to find its text again)


def encode_pair(tokenizer, prompt: Prompt, chosen: str, rejected: str, margin: float | None, max_length: int,
                max_prompt_length: int, report: TruncationReport, known: Pretokenized | None = None
                ) -> PairFeatures | None:
    """known: as for `encode_sft`."""
    report.examples += 1
    chosen_ids, rejected_ids = encode_response(tokenizer, chosen, known), encode_response(tokenizer, rejected, known)
    room = max_length - max(len(chosen_ids), len(rejected_ids))
    if room < 1:
        report.note("dropped_response_too_long")
        return None
    prompt_ids = fit_prompt(encode_prompt(tokenizer, prompt, known), min(max_prompt_length, room), report)
    return PairFeatures(prompt_ids + chosen_ids, prompt_ids + rejected_ids, len(prompt_ids), len(prompt_ids),
                        0.0 if margin is None else float(margin))
