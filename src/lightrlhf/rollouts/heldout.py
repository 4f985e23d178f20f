"""Held-out generation for evaluation: fixed prompts, fixed seed, scored, logged as text.

Every evaluation samples the same held-out prompts with the same seed, so two evaluations differ
only by the model; the evaluator's mean over >= 512 samples is what makes a 0.1-std difference
visible above sampling noise. The global RNG is untouched (a private generator is used), so
evaluating never changes what training samples next -- which keeps resumed runs identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightrlhf.models.generation import Generation, decode_responses, left_pad, sample
from lightrlhf.validation import non_negative, positive, require


@dataclass(frozen=True)
class GenerationSpec:
    """How responses are sampled: temperature (0 = greedy), top-k (0 = off), top-p, length."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks); EOS is then an ordinary token

    def __post_init__(self) -> None:
        positive("max_new_tokens", self.max_new_tokens)
        non_negative("temperature", self.temperature)
        non_negative("top_k", self.top_k)
        require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out sampling: how many prompts, how many rows go into the logged sample table, the seed."""

    num_prompts: int = 512
    num_logged: int = 8
    batch_size: int = 128
    seed: int = 1234
    at_start: bool = True  # also evaluate before the first step: the "untrained" reference point

    def __post_init__(self) -> None:
        non_negative("num_prompts", self.num_prompts)
        non_negative("num_logged", self.num_logged)
        positive("batch_size", self.batch_size)


def sample_texts(model: Callable, tokenizer, prompts: list[tuple[list[int], str]], spec: GenerationSpec,
                 seed: int, batch_size: int,
                 model_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 ) -> tuple[list[str], list[Generation]]:
    generator = torch.Generator().manual_seed(seed)
    texts, generations = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_pad([p for p, _ in chunk], tokenizer.pad_token_id)
        gen = sample(model, ids, mask, max_new_tokens=spec.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, temperature=spec.temperature, top_k=spec.top_k,
                     top_p=spec.top_p, generator=generator, model_context=model_context,
                     stop_at_eos=not spec.ignore_eos)
        texts.extend(decode_responses(tokenizer, gen))
        generations.append(gen)
    return texts, generations


def response_stats(generations: list[Generation]) -> dict[str, float]:
    lengths = torch.cat([g.response_mask.sum(1) for g in generations]).float()
    eos = torch.cat([g.ended_with_eos for g in generations]).float()
    return {"length_mean": lengths.mean().item(), "frac_ended_with_eos": eos.mean().item()}
