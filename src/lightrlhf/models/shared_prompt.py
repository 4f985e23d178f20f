"""Log-probs of several responses to one prompt, with the prompt run through the model once.

DPO scores a chosen and a rejected response to the same prompt. As two rows of one batch, the
prompt's tokens go through the model twice, though a causal model computes exactly the same for
them in both rows. Here each prompt runs once, filling a KV cache; the cache is repeated for the
prompt's k responses, which then run against it (as sampling feeds a chunk of tokens):

    prompts  [B, P] left-padded          -> cache, logits of the last prompt position
    responses [B * k, R] right-padded    -> against the repeated cache, rows i*k .. i*k + k-1 answer prompt i

log pi(y_t) is the same function of the weights as in one [B * k, P + R] forward, gradients
included (they reach the prompt's positions through the repeated cache); only the rounding of
the kernels differs. With P = R and k = 2 the model runs on 3/4 of the token positions; a GRPO/RLOO
group of k = 4 samples of one prompt (P = R) on 5/8 of them, in its reference and policy forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightrlhf.models.generation import cache_argument, left_pad, positions_from_mask
from lightrlhf.rl.logprobs import token_logprobs


@dataclass
class PromptResponses:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B * k, R] right-padded; rows i*k .. i*k + k-1 answer prompt i
    response_mask: Tensor  # [B * k, R]
    group_size: int  # k


def split_prompts(rows: list[tuple[Tensor, Tensor, Tensor]], pad_id: int) -> PromptResponses | None:
    """From k right-padded batches of prompt + response (ids [B, T], attention mask [B, T], response
    length [B] each, all answering the same B prompts) the prompts once and the responses grouped by
    prompt; None when some prompt differs between the k batches (then there is nothing to share)."""
    k = len(rows)
    prompts, responses = [], []
    lists = [(ids.tolist(), mask.sum(1).tolist(), length.tolist()) for ids, mask, length in rows]
    for i in range(rows[0][0].shape[0]):
        prompt = None
        for ids, real, length in lists:
            row, end = ids[i], real[i]
            start = end - length[i]
            if prompt is None:
                prompt = row[:start]
            elif row[:start] != prompt:
                return None
            responses.append(row[start:end])
        prompts.append(prompt)
    if min(len(r) for r in responses) == 0 or min(len(p) for p in prompts) == 0:
        return None
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for j, response in enumerate(responses):
        response_ids[j, :len(response)] = torch.as_tensor(response, dtype=torch.long)
        response_mask[j, :len(response)] = 1
    device = rows[0][0].device
    return PromptResponses(prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                           response_mask.to(device), k)


def _run_prompts(model, batch: PromptResponses, **kwargs):
    """(the prompts' forward output, the cache keyword argument holding their KV cache)."""
    from transformers import DynamicCache

    cached = {cache_argument(model): DynamicCache()}
    out = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                position_ids=positions_from_mask(batch.prompt_mask), use_cache=True, **kwargs, **cached)
    return out, cached


def _run_responses(model, batch: PromptResponses, cached: dict, inputs: Tensor, mask: Tensor):
    """The forward output of `inputs` (response tokens [B * k, n]) against the prompts' cache, repeated
    for each prompt's k rows."""
    k = batch.group_size
    next(iter(cached.values())).batch_repeat_interleave(k)
    full_mask = torch.cat([batch.prompt_mask.repeat_interleave(k, dim=0), mask], dim=1)
    positions = positions_from_mask(full_mask)[:, batch.prompt_ids.shape[1]:]
    return model(input_ids=inputs, attention_mask=full_mask, position_ids=positions, use_cache=True, **cached)


def response_logits(model, batch: PromptResponses) -> Tensor:
    """[B * k, R, V]: position t holds the logits that predict response token t (the last prompt
    position predicts token 0), as `model(prompt + response)[:, P - 1:-1]` would give them. Call it
    inside the role's context; gradients flow (see the module docstring)."""
    prompt, cached = _run_prompts(model, batch, logits_to_keep=1)
    logits = [prompt.logits.repeat_interleave(batch.group_size, dim=0)]
    if batch.response_ids.shape[1] > 1:
        # the last response token predicts nothing: it is not fed
        logits.append(_run_responses(model, batch, cached, batch.response_ids[:, :-1],
                                     batch.response_mask[:, :-1]).logits)
    return torch.cat(logits, dim=1)


def last_response_hidden(backbone, batch: PromptResponses) -> Tensor:
    """[B * k, H] the transformer body's last hidden state at each row's last response token (what a
    reward head scores), each prompt run once for its k responses. Every response has >= 1 token."""
    _, cached = _run_prompts(backbone, batch)
    hidden = _run_responses(backbone, batch, cached, batch.response_ids, batch.response_mask).last_hidden_state
    last = batch.response_mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0]), last]


def response_logprobs(model, batch: PromptResponses) -> tuple[Tensor, Tensor]:
    """(sum_t log pi(y_t), length) per response row [B * k] of a causal LM (the active adapter's
    role: call it inside the role's context). See the module docstring."""
    per_token = token_logprobs(response_logits(model, batch), batch.response_ids)
    scored = batch.response_mask.bool()
    # detail: select with `where`, not multiply: a padded position's log-prob may be -inf.
    total = torch.where(scored, per_token, 0.0).sum(1)
    return total, scored.sum(1).float()


def grouped(sequences: Tensor, attention_mask: Tensor, prompt_width: int, response_mask: Tensor,
            group_size: int) -> PromptResponses:
    """A sampled batch whose rows i*k .. i*k + k-1 answer prompt i (left-padded prompts of width P, then
    right-padded responses), as prompts once and responses grouped: what `sample(repeats=k)` returns."""
    k = group_size
    return PromptResponses(sequences[::k, :prompt_width], attention_mask[::k, :prompt_width],
                           sequences[:, prompt_width:], response_mask.long(), k)


def checkpointing(model) -> bool:
    """Whether activation checkpointing is on anywhere in `model` (it drops the KV cache in training)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
