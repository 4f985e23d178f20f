"""Held-out generation for evaluation: fixed prompts, fixed seed, scored, logged as text.

Every evaluation samples the same held-out prompts with the same seed, so two evaluations differ
only by the model; the evaluator's mean over >= 512 samples is what makes a 0.1-std difference
visible above sampling noise. The global RNG is untouched (a private generator is used), so
evaluating never changes what training samples next -- which keeps resumed runs identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from lightrlhf.models.generation import Generation, decode_responses, left_pad, sample
from lightrlhf.rollouts.specs import GenerationSpec


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
