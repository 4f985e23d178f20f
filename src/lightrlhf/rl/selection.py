"""Which pairs to ask about: a score for every pair of responses to a prompt, and a label budget.

A prompt has n sampled responses y_1 .. y_n, and a reward-model ensemble gives member rewards
r_k(y_i), k = 1 .. K, as a [K, P, n] tensor for P prompts. Every unordered pair (i, j), i < j, in the
order of `pair_index(n)`, gets a score; `select_pairs` spends the budget on the highest.

    random        u_ij ~ U(0, 1)
    disagreement  std_k sigmoid(r_k(y_i) - r_k(y_j))
    ucb           U_i + U_j,   U_i = mean_k c_k(y_i) + c * std_k c_k(y_i),   c_k(y_i) = r_k(y_i) - 1/n sum_l r_k(y_l)

- `random` is the baseline: the pairs a person would be given without any model.
- `disagreement` is query-by-committee on the preference itself: how much the members disagree
  about the probability that y_i wins (Christiano et al. 2017, sec. 2.2.4, "the variance of the
  predictors' preferences across the ensemble"; Lee et al. 2021, B-Pref, "disagreement sampling").
  It is the Bradley-Terry probability, not the reward difference, whose spread is measured: members
  that agree on the winner but not on by how much (sigmoid(5) vs sigmoid(10)) have nothing to learn
  from a label, and the probability saturates there while the difference does not.
- `ucb` is the upper-confidence rule (Auer et al. 2002), optimism in the face of uncertainty: each
  response gets mean + c * std of its reward, and the pair of the two highest is asked, i.e. "which
  of the two answers that could be best is better?" (a deterministic cousin of double Thompson
  sampling, Dwaracherla et al. 2024). With c = 0 it refines the ranking at the top, where a policy
  optimised against the reward model goes; larger c favours responses whose rank is uncertain.
  Rewards are centred within the prompt and per member, so the score compares across prompts (an
  easy prompt whose answers all score high is not preferred for that) and no member's Bradley-Terry
  constant enters the std.

Scores of different rules are on different scales; only their order within one rule matters.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightrlhf.rl.ensemble import ensemble_mean_std

Rule = Literal["random", "disagreement", "ucb"]
RULES: tuple[str, ...] = ("random", "disagreement", "ucb")


def pair_index(n: int) -> Tensor:
    """[2, n(n-1)/2] the (i, j), i < j, of every unordered pair of n responses, row by row."""
    return torch.triu_indices(n, n, offset=1)


def disagreement_scores(member_rewards: Tensor) -> Tensor:
    """[P, M] std over members of sigmoid(r_k(y_i) - r_k(y_j)) for each pair; [K, P, n] in."""
    i, j = pair_index(member_rewards.shape[-1])
    probability = torch.sigmoid(member_rewards[..., i] - member_rewards[..., j])  # [K, P, M]
    return ensemble_mean_std(probability)[1]


def optimistic_rewards(member_rewards: Tensor, c: float) -> Tensor:
    """[P, n] U_i = mean + c * std over members of the rewards centred within each prompt."""
    centred = member_rewards - member_rewards.mean(-1, keepdim=True)
    mean, std = ensemble_mean_std(centred)
    return mean + c * std


def ucb_scores(member_rewards: Tensor, c: float) -> Tensor:
    """[P, M] U_i + U_j for each pair; [K, P, n] in."""
    upper = optimistic_rewards(member_rewards, c)
    i, j = pair_index(member_rewards.shape[-1])
    return upper[:, i] + upper[:, j]


def random_scores(prompts: int, n: int, generator: torch.Generator) -> Tensor:
    """[P, M] independent U(0, 1) scores: selecting the top ones is a uniformly random choice."""
    return torch.rand(prompts, n * (n - 1) // 2, generator=generator, dtype=torch.float64)


def pair_scores(rule: Rule, member_rewards: Tensor | None, prompts: int, n: int, c: float,
                generator: torch.Generator) -> Tensor:
    """The scores of `rule` for P prompts of n responses each ([P, n(n-1)/2])."""
    if rule == "random":
        return random_scores(prompts, n, generator)
    if member_rewards is None:
        raise ValueError(f"selection {rule!r} needs the ensemble's rewards")
    if rule == "disagreement":
        return disagreement_scores(member_rewards)
    if rule == "ucb":
        return ucb_scores(member_rewards, c)
    raise ValueError(f"unknown selection rule {rule!r} (one of {', '.join(RULES)})")


def select_pairs(scores: Tensor, budget: int, per_prompt: int = 1, valid: Tensor | None = None) -> list[tuple[int, int]]:
    """(prompt, pair) of the chosen pairs, highest score first.

    Each prompt offers its `per_prompt` best valid pairs (so the budget spreads over prompts instead
    of asking about one prompt's answers again and again); the `budget` best of those are chosen.
    Equal scores go to the lower (prompt, pair) index, so the choice is deterministic. Fewer than
    `budget` pairs come back when fewer are offered. `valid` [P, M] bool marks pairs that may be
    asked (False: identical answers, a pair asked already)."""
    if budget < 0 or per_prompt < 1:
        raise ValueError(f"budget must be >= 0 and per_prompt >= 1, got {budget} and {per_prompt}")
    scores = scores.double()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :per_prompt]  # [P, per_prompt]
    offered = torch.gather(scores, 1, order)
    prompt_of = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(order)
    keep = offered > float("-inf")
    flat_scores, flat_prompt, flat_pair = offered[keep], prompt_of[keep], order[keep]
    # detail: a stable sort of (prompt, rank)-ordered offers keeps lower indices first among equals
    ranked = torch.sort(flat_scores, descending=True, stable=True).indices[:budget]
    return [(int(flat_prompt[r]), int(flat_pair[r])) for r in ranked]
