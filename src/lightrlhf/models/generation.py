"""Sampling responses with a KV cache, in a loop small enough to read.

Prompts are left-padded so that every row's next token sits in the last column; positions are
counted from each row's first real token, so padding never shifts RoPE positions. Each step feeds
only the newest token and reuses the cache. A row stops at its EOS: later positions hold the pad
token and are masked out (`response_mask` covers the response up to and including EOS).

Two things keep the loop near the cost of the model's own arithmetic: the KV cache and the attention
mask are reserved once for prompt width + max_new_tokens and written in place (models/kv_cache.py;
growing them by `torch.cat` copies every earlier position at every step), and a prompt sampled k times
(GRPO/RLOO groups) runs through the model once, its cache repeated for its k rows.

Sampling and scoring share one definition of temperature: the caller computes log-probs of the
sampled tokens with `rl.token_logprobs(logits, tokens, temperature)`, the same temperature used
here, so PPO's ratio starts at exactly 1.

`mix_epsilon > 0` (with a `mix_model`) draws each token from the reference policy with probability
epsilon instead of the policy: an exploration knob that keeps some samples near the reference
distribution. The behaviour policy is then a mixture, but PPO's old log-probs are still the
policy's own, so the importance ratio stays the policy-to-policy one PPO assumes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightrlhf.models.kv_cache import preallocated_cache
from lightrlhf.rl.next_token import sample_tokens


@dataclass
class Generation:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, R] right-padded with pad_token_id after EOS
    response_mask: Tensor  # [B, R] 1 on generated tokens up to and including EOS
    ended_with_eos: Tensor  # [B] bool

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0 too)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_argument(model: Callable) -> str:
    """The keyword a model's forward takes its KV cache by (`cache` since transformers 5.24)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


class _Stepper:
    """Feeds one model token by token with its own KV cache, reserved for `capacity` positions."""

    def __init__(self, model: Callable, context: Callable[[], contextlib.AbstractContextManager], capacity: int):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.context = model, context
        self.cache = preallocated_cache(getattr(base, "config", None), capacity)
        self.cache_kwargs = {cache_argument(model): self.cache}

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        with self.context():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **self.cache_kwargs)
        return out.logits[:, -1, :].float()

    def prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, repeats: int) -> Tensor:
        """The prompts' last logits, each prompt run once and its cache repeated for its `repeats` rows."""
        logits = self(ids, mask, positions)
        if repeats > 1:
            self.cache.batch_repeat_interleave(repeats)
            logits = logits.repeat_interleave(repeats, dim=0)
        return logits


@torch.no_grad()
def sample(model: Callable, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, stop_at_eos: bool = True, repeats: int = 1,
           model_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
           mix_model_context: Callable[[], contextlib.AbstractContextManager] | None = None,
           mix_epsilon: float = 0.0) -> Generation:
    """Sample up to `max_new_tokens` tokens per prompt (see module docstring); `repeats` > 1 draws that
    many responses per prompt (rows i*repeats .. i*repeats + repeats-1 answer prompt i), running each
    prompt through the model once: a group of k samples costs one prompt forward, not k."""
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(repeats, dim=0), prompt_mask.repeat_interleave(repeats, 0)
    unique = slice(None, None, repeats)  # the first row of each prompt's group
    batch, width = prompt_ids.shape
    mixing = mix_epsilon > 0 and mix_model_context is not None
    # detail: a role switch walks every module (peft's set_adapter, milliseconds); sampling from one
    # role switches once for the whole loop, only mixing two roles switches at every token.
    capacity = width + max_new_tokens
    policy = _Stepper(model, model_context if mixing else contextlib.nullcontext, capacity)
    reference = _Stepper(model, mix_model_context, capacity) if mixing else None
    # the mask of every position the loop can reach, written as tokens come; step t reads [:, :width + t]
    mask = torch.zeros(batch, capacity, dtype=prompt_mask.dtype)
    mask[:, :width] = prompt_mask
    positions = positions_from_mask(prompt_mask)
    step_positions = positions[:, -1:]
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens_out, mask_out = [], []
    with contextlib.nullcontext() if mixing else model_context():
        logits = policy.prefill(prompt_ids[unique], prompt_mask[unique], positions[unique], repeats)
        ref_logits = (reference.prefill(prompt_ids[unique], prompt_mask[unique], positions[unique], repeats)
                      if reference is not None else None)
        for step in range(max_new_tokens):
            tokens = sample_tokens(logits, temperature, top_k, top_p, generator)
            if reference is not None:
                ref_tokens = sample_tokens(ref_logits, temperature, top_k, top_p, generator)
                use_ref = torch.rand(batch, generator=generator) < mix_epsilon
                tokens = torch.where(use_ref, ref_tokens, tokens)
            alive = ~finished
            tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_token_id))
            tokens_out.append(tokens)
            mask_out.append(alive.long())
            if stop_at_eos:
                finished = finished | (tokens == eos_token_id)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask[:, width + step] = alive.long()
            step_positions = step_positions + 1
            seen = mask[:, :width + step + 1]
            logits = policy(tokens[:, None], seen, step_positions)
            if reference is not None:
                ref_logits = reference(tokens[:, None], seen, step_positions)
    response_ids = torch.stack(tokens_out, dim=1)
    response_mask = torch.stack(mask_out, dim=1)
    ended = ((response_ids == eos_token_id) & response_mask.bool()).any(dim=1)
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, ended)


def decode_responses(tokenizer, generation: Generation) -> list[str]:
    rows = [ids[m.bool()].tolist() for ids, m in zip(generation.response_ids, generation.response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
