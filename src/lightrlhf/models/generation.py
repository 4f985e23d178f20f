"""Sampling responses with a KV cache, in a loop small enough to read.

Prompts are left-padded so that every row's next token sits in the last column; positions are
counted from each row's first real token, so padding never shifts RoPE positions. Each step feeds
only the newest token and reuses the cache. A row stops at its EOS: later positions hold the pad
token and are masked out (`response_mask` covers the response up to and including EOS).

Two things keep the loop near the cost of the model's own arithmetic: the KV cache and the attention
mask are reserved once for prompt width + max_new_tokens and written in place (models/kv_cache.py;
growing them by `torch.cat` copies every earlier position at every step), and a prompt sampled k times
(GRPO/RLOO groups) runs through the model once, its cache repeated for its k rows. After the prompt,
a Llama-family model (llama, mistral, qwen2; full attention) decodes with models/fast_decode.py's
lean step, the same arithmetic as transformers' forward without its per-token Python and dispatch
(a decode step of the benchmark workload: 5.5 -> 3.8 ms with 2 threads, bench/decode.py); other
models, and `fast=False`, keep transformers' forward.

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

from lightrlhf.models.fast_decode import LeanDecoder, lean_decoder
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
    """Feeds one model token by token with its own KV cache, reserved for `capacity` positions. With
    `fast`, a model that qualifies decodes with models/fast_decode.py's lean step after transformers'
    forward has run the prompts; any other model keeps transformers' forward for every step."""

    def __init__(self, model: Callable, context: Callable[[], contextlib.AbstractContextManager], capacity: int,
                 fast: bool = True):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.context, self.capacity, self.fast = model, context, capacity, fast
        self.cache = preallocated_cache(getattr(base, "config", None), capacity)
        self.cache_kwargs = {cache_argument(model): self.cache}
        self.lean: LeanDecoder | None = None

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
        if self.fast:
            # detail: built inside the role context, so it reads the weights (merged or not) and the
            # active adapters that the prefill ran with
            with self.context():
                self.lean = lean_decoder(self.model, self.cache, mask.repeat_interleave(repeats, dim=0), self.capacity)
        return logits

    def decode(self, tokens: Tensor, mask: Tensor, length: int, positions: Tensor) -> Tensor:
        """Logits after feeding `tokens` [B] at `positions` [B, 1]; `mask` [B, capacity] holds every
        position's attention mask, of which the first `length` (the new token's included) are written."""
        if self.lean is None:
            return self(tokens[:, None], mask[:, :length], positions)
        # detail: mixing two roles switches the active adapter at every token; a self-contained lean
        # step read its role's weights when it was built, so the switch is skipped
        with contextlib.nullcontext() if self.lean.self_contained else self.context():
            return self.lean.step(tokens, mask[:, length - 1], positions[:, 0])


@torch.no_grad()
def sample(model: Callable, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, stop_at_eos: bool = True, repeats: int = 1,
           model_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
           mix_model_context: Callable[[], contextlib.AbstractContextManager] | None = None,
           mix_epsilon: float = 0.0, fast: bool = True) -> Generation:
    """Sample up to `max_new_tokens` tokens per prompt (see module docstring); `repeats` > 1 draws that
    many responses per prompt (rows i*repeats .. i*repeats + repeats-1 answer prompt i), running each
    prompt through the model once: a group of k samples costs one prompt forward, not k. `fast=False`
    decodes with transformers' forward even where the lean step applies (the benchmark's baseline)."""
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(repeats, dim=0), prompt_mask.repeat_interleave(repeats, 0)
    unique = slice(None, None, repeats)  # the first row of each prompt's group
    batch, width = prompt_ids.shape
    mixing = mix_epsilon > 0 and mix_model_context is not None
    # detail: a role switch walks every module (peft's set_adapter, milliseconds); sampling from one
    # role switches once for the whole loop, only mixing two roles switches at every token.
    capacity = width + max_new_tokens
    policy = _Stepper(model, model_context if mixing else contextlib.nullcontext, capacity, fast)
    reference = _Stepper(model, mix_model_context, capacity, fast) if mixing else None
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
            logits = policy.decode(tokens, mask, width + step + 1, step_positions)
            if reference is not None:
                ref_logits = reference.decode(tokens, mask, width + step + 1, step_positions)
    response_ids = torch.stack(tokens_out, dim=1)
    response_mask = torch.stack(mask_out, dim=1)
    ended = ((response_ids == eos_token_id) & response_mask.bool()).any(dim=1)
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, ended)


def decode_responses(tokenizer, generation: Generation) -> list[str]:
    rows = [ids[m.bool()].tolist() for ids, m in zip(generation.response_ids, generation.response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
