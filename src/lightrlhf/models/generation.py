"""Sampling responses with a KV cache, in a loop small enough to read.

Prompts are left-padded so that every row's next token sits in the last column; positions are
counted from each row's first real token, so padding never shifts RoPE positions. Each step feeds
only the newest token and reuses the cache. A row stops at its EOS: later positions hold the pad
token and are masked out (`response_mask` covers the response up to and including EOS).

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
    """Feeds one model token by token with its own KV cache."""

    def __init__(self, model: Callable, context: Callable[[], contextlib.AbstractContextManager]):
        from transformers import DynamicCache

        self.model, self.context = model, context
        self.cache_kwargs = {cache_argument(model): DynamicCache()}

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        with self.context():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **self.cache_kwargs)
        return out.logits[:, -1, :].float()


@torch.no_grad()
def sample(model: Callable, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, stop_at_eos: bool = True,
           model_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
           mix_model_context: Callable[[], contextlib.AbstractContextManager] | None = None,
           mix_epsilon: float = 0.0) -> Generation:
    """Sample up to `max_new_tokens` tokens per prompt (see module docstring)."""
    batch = prompt_ids.shape[0]
    mixing = mix_epsilon > 0 and mix_model_context is not None
    # detail: a role switch walks every module (peft's set_adapter, milliseconds); sampling from one
    # role switches once for the whole loop, only mixing two roles switches at every token.
    policy = _Stepper(model, model_context if mixing else contextlib.nullcontext)
    reference = _Stepper(model, mix_model_context) if mixing else None
    mask = prompt_mask.clone()
    positions = positions_from_mask(mask)
    step_ids, step_positions = prompt_ids, positions
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens_out, mask_out = [], []
    with contextlib.nullcontext() if mixing else model_context():
        for _ in range(max_new_tokens):
            logits = policy(step_ids, mask, step_positions)
            tokens = sample_tokens(logits, temperature, top_k, top_p, generator)
            if reference is not None:
                ref_logits = reference(step_ids, mask, step_positions)
                ref_tokens = sample_tokens(ref_logits, temperature, top_k, top_p, generator)
                use_ref = torch.rand(batch, generator=generator) < mix_epsilon
                tokens = torch.where(use_ref, ref_tokens, tokens)
            alive = ~finished
            tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_token_id))
            tokens_out.append(tokens)
            mask_out.append(alive.long())
            if stop_at_eos:
                finished = finished | (tokens == eos_token_id)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, alive.long()[:, None]], dim=1)
            step_positions = step_positions[:, -1:] + 1
            step_ids = tokens[:, None]
    response_ids = torch.stack(tokens_out, dim=1)
    response_mask = torch.stack(mask_out, dim=1)
    ended = ((response_ids == eos_token_id) & response_mask.bool()).any(dim=1)
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, ended)


def decode_responses(tokenizer, generation: Generation) -> list[str]:
    rows = [ids[m.bool()].tolist() for ids, m in zip(generation.response_ids, generation.response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
