"""One rollout for every online method: k responses per prompt, with the log-probs they learn from.

    prompts p_1..p_P  --sample k each-->  rows p_1 y_11 .. p_1 y_1k, p_2 y_21, ...   (row = p * k + j)

PPO uses k = 1 and a critic; GRPO and RLOO use k > 1 and compare the k responses of a prompt with
each other (`Rollout.group_index`); best-of-n and RAFT keep the best of each group. Everything here
runs with dropout off (the policy in its rollout state) and without gradient, except the policy's
forward of `roll_out(differentiable=True)`, which an update of one pass reuses:

- `logprobs`, `ref_logprobs`: log pi(y_t) of the sampled tokens under the policy and the reference,
  at the sampling temperature, so that on the first update the importance ratio is exactly 1 and
  the KL at step 0 is exactly 0.
- Top-k / top-p: the tokens are drawn from the filtered distribution, but the log-probs are those of
  the full temperature-scaled distribution (as TRL and OpenRLHF compute them). Filtered log-probs
  would make the ratio and the KL infinite as soon as the new policy's or the reference's filter
  drops a sampled token. The cost is that the samples are slightly off-policy (by the filtered
  mass); keep top_k = 0 and top_p = 1 for training unless that is what you study.
- `values`: the critic's V at each response position, only for a model with a critic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightrlhf.models.adapters import merged_adapter
from lightrlhf.models.generation import decode_responses, left_pad, sample
from lightrlhf.models.shared_prompt import checkpointing, grouped, response_logits
from lightrlhf.rl.logprobs import entropy_from_logits, token_logprobs
from lightrlhf.rollouts.specs import GenerationSpec


class PolicyRoles(Protocol):
    """A policy with its reference on one module (see models/actor_critic.py)."""

    module: Any
    tokenizer: Any
    has_critic: bool

    def policy_context(self) -> contextlib.AbstractContextManager: ...

    def reference_context(self) -> contextlib.AbstractContextManager: ...

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, last: int = 0) -> Tensor: ...

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, last: int = 0) -> Tensor: ...

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


@dataclass
class Responses:
    """Sampled responses, `group_size` per prompt; [N, R] tensors are over response tokens."""

    sequences: Tensor  # [N, P + R] prompt (left-padded) + response (right-padded)
    attention_mask: Tensor
    prompt_width: int
    responses: Tensor  # [N, R]
    mask: Tensor  # [N, R] float, 1 on response tokens up to and including EOS
    ended_with_eos: Tensor  # [N] bool
    prompts: list[str]  # per row: the prompt as the policy saw it (chat template applied)
    raw_prompts: list  # per row: the prompt as the data file gave it (for a reward model on another tokenizer)
    texts: list[str]  # per row: the decoded response
    group_size: int

    @property
    def rows(self) -> int:
        return self.sequences.shape[0]

    @property
    def group_index(self) -> Tensor:
        """[N] the prompt each row answers: rows of one group share it."""
        return torch.arange(self.rows) // self.group_size

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)


@dataclass
class Rollout(Responses):
    """Responses with what online methods learn from, measured without gradient."""

    logprobs: Tensor  # [N, R] log pi(y_t)
    ref_logprobs: Tensor | None  # [N, R] log pi_ref(y_t); None when the caller needs no reference
    entropy: Tensor  # [N, R] H(pi(.|y_<t))
    values: Tensor | None = None  # [N, R] V(y_<=t), only with a critic
    # [N, R] `logprobs` still attached to the graph of their forward, only with `roll_out(differentiable=True)`
    logprobs_graph: Tensor | None = None
    # [N, R] `entropy` / `values` attached to their forward's graph, with `differentiable=True` and asked for
    entropy_graph: Tensor | None = None
    values_graph: Tensor | None = None


def repeat_each(items: Sequence, times: int) -> list:
    """[a, b] -> [a, a, b, b] for times = 2: the row order of a grouped rollout."""
    return [item for item in items for _ in range(times)]


@torch.no_grad()
def sample_responses(roles: PolicyRoles, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str],
                     raw_prompts: Sequence, spec: GenerationSpec, generator: torch.Generator, *, group_size: int = 1,
                     reference: bool = False, explore_epsilon: float = 0.0) -> Responses:
    """Sample `group_size` responses per prompt from the policy (or the reference) and decode them."""
    tok = roles.tokenizer
    ids, mask = left_pad(prompt_ids, tok.pad_token_id)
    explore = explore_epsilon > 0 and not reference
    context = roles.reference_context if reference else roles.policy_context
    if spec.merge_adapter and not reference and not explore:  # mixing switches roles at every token
        context = _merged(roles.policy_context, roles.module)
    gen = sample(roles.module, ids, mask, repeats=group_size, max_new_tokens=spec.max_new_tokens, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                 generator=generator, stop_at_eos=not spec.ignore_eos,
                 model_context=context,
                 mix_model_context=roles.reference_context if explore else None,
                 mix_epsilon=explore_epsilon if explore else 0.0)
    return Responses(gen.sequences, gen.attention_mask, ids.shape[1], gen.response_ids, gen.response_mask.float(),
                     gen.ended_with_eos, repeat_each(prompts, group_size), repeat_each(raw_prompts, group_size),
                     decode_responses(tok, gen), group_size)


def _merged(role_context, module):
    @contextlib.contextmanager
    def context():
        with role_context(), merged_adapter(module):
            yield
    return context


def chunks(rows: int, size: int | None, align: int = 1) -> list[slice]:
    """Row slices of at most `size` (all rows at once when None): bounds a forward's memory. With
    `align` k, a slice holds whole groups of k rows (rounded up to one group at least)."""
    size = rows if size is None else max(align, size // align * align)
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


def scoring_logits(roles: PolicyRoles, responses: Responses, rows: slice | Tensor, reference: bool = False,
                   group_size: int | None = None) -> Tensor:
    """[n, R, V] logits of the policy (or the reference) that predict each response token of `rows`.

    A group of k responses to one prompt runs its prompt once (models/shared_prompt.py): the forward
    covers P + k*R positions instead of k*(P + R). `rows` must then hold whole groups, in order;
    `group_size=1` runs every row whole (rows in any order). Activation checkpointing drops the KV
    cache the shared prompt needs, so a checkpointed model runs the rows whole too."""
    k = responses.group_size if group_size is None else group_size
    if k > 1 and not checkpointing(roles.module):
        batch = grouped(responses.sequences[rows], responses.attention_mask[rows], responses.prompt_width,
                        responses.mask[rows], k)
        with roles.reference_context() if reference else roles.policy_context():
            return response_logits(roles.module, batch)
    forward = roles.reference_logits if reference else roles.policy_logits
    return forward(responses.sequences[rows], responses.attention_mask[rows],
                   last=response_logit_positions(responses))[:, :-1]


def group_order(rows: int, group_size: int, generator: torch.Generator) -> Tensor:
    """A random order of whole groups, each group's rows kept together and in order: [2, 0, 1] with
    k = 2 gives rows [4, 5, 0, 1, 2, 3]."""
    groups = torch.randperm(rows // group_size, generator=generator)
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


@torch.no_grad()
def token_statistics(roles: PolicyRoles, responses: Responses, temperature: float, forward_batch_size: int | None,
                     with_values: bool, with_policy: bool = True, with_reference: bool = True) -> dict[str, Tensor]:
    """Policy and reference log-probs, policy entropy (and values) over the response positions;
    `with_policy=False` leaves out the policy's (see `policy_statistics`), `with_reference=False` the
    reference's (its forward is then not run)."""
    seq, attn, width = responses.sequences, responses.attention_mask, responses.prompt_width
    out: dict[str, list[Tensor]] = {"logprobs": [], "ref_logprobs": [], "entropy": [], "values": []}
    for rows in chunks(seq.shape[0], forward_batch_size, responses.group_size):
        tokens = responses.responses[rows]
        if with_policy:
            logits = scoring_logits(roles, responses, rows)
            out["logprobs"].append(token_logprobs(logits, tokens, temperature))
            out["entropy"].append(entropy_from_logits(logits, temperature))
            del logits
        if with_reference:
            ref = scoring_logits(roles, responses, rows, reference=True)
            out["ref_logprobs"].append(token_logprobs(ref, tokens, temperature))
            del ref
        if with_values:
            out["values"].append(roles.values(seq[rows], attn[rows])[:, width - 1:-1])
    return {k: torch.cat(v) for k, v in out.items() if v}


def policy_statistics(roles: PolicyRoles, responses: Responses, temperature: float,
                      entropy_graph: bool = False) -> dict[str, Tensor]:
    """The policy's log-probs and entropy over the response positions in one forward *with* gradient:
    `logprobs_graph` keeps the graph for an update to backpropagate, `logprobs` is its detached value;
    `entropy_graph=True` keeps the entropy's too (an entropy bonus backpropagates it)."""
    logits = scoring_logits(roles, responses, slice(None))
    logprobs = token_logprobs(logits, responses.responses, temperature)
    out = {"logprobs": logprobs.detach(), "logprobs_graph": logprobs}
    if entropy_graph:
        entropy = entropy_from_logits(logits, temperature)
        out.update(entropy=entropy.detach(), entropy_graph=entropy)
    else:
        with torch.no_grad():
            out["entropy"] = entropy_from_logits(logits.detach(), temperature)
    return out


def value_statistics(roles: PolicyRoles, responses: Responses) -> dict[str, Tensor]:
    """The critic's values over the response positions in one forward *with* gradient (`values_graph`)."""
    values = roles.values(responses.sequences, responses.attention_mask)[:, responses.prompt_width - 1:-1]
    return {"values": values.detach(), "values_graph": values}


def response_logit_positions(responses: Responses) -> int:
    """How many trailing positions' logits score the responses: the distribution that produced response
    token t sits at position prompt_width - 1 + t, so the last R + 1 (the final one predicts nothing;
    callers drop it with [:, :-1]). The LM head need not run on the prompt's other positions."""
    return responses.responses.shape[1] + 1


def scoring_temperature(spec: GenerationSpec) -> float:
    """The temperature log-probs are taken at: the sampling one (greedy decoding scores at 1)."""
    return spec.temperature if spec.temperature > 0 else 1.0


def roll_out(roles: PolicyRoles, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], raw_prompts: Sequence,
             spec: GenerationSpec, generator: torch.Generator, *, group_size: int = 1,
             forward_batch_size: int | None = None, with_values: bool = False,
             explore_epsilon: float = 0.0, differentiable: bool = False, with_reference: bool = True,
             entropy_graph: bool = False) -> Rollout:
    """Sample `group_size` responses per prompt and measure them (see module docstring).

    `differentiable`: the policy's forward (and the critic's, `with_values`) runs with gradient, all
    rows at once, and the rollout keeps its graph (`logprobs_graph`, `values_graph`; `entropy_graph`
    too when asked). For an update whose first minibatch is the whole rollout, taken with the weights
    it was sampled with, those forwards *are* the update's, so they run once, not twice.
    `with_reference=False`: no reference forward, `ref_logprobs` is None."""
    responses = sample_responses(roles, prompt_ids, prompts, raw_prompts, spec, generator, group_size=group_size,
                                 explore_epsilon=explore_epsilon)
    temperature = scoring_temperature(spec)
    with_values = with_values and roles.has_critic
    stats = token_statistics(roles, responses, temperature, forward_batch_size, with_values and not differentiable,
                             with_policy=not differentiable, with_reference=with_reference)
    if differentiable:
        stats.update(policy_statistics(roles, responses, temperature, entropy_graph))
        if with_values:
            stats.update(value_statistics(roles, responses))
    stats.setdefault("ref_logprobs", None)
    return Rollout(**vars(responses), **stats)
