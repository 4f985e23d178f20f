"""Held-out evaluation of a policy trained against its reference (PPO, DPO, ...): the same prompts
and seed every time.

For each held-out batch: sample from the policy with a fixed seed, score with the scorer (raw
composite score; an offline method such as DPO has no scorer), KL to the reference summed over the
response (k1, the unbiased estimator), length and EOS fraction; with an evaluator (the demo's hidden
gold scorer) also the gold score and the win rate against the *reference* policy's samples for the
same prompts and seed (the initial SFT policy, sampled once and cached). Sampling uses a private
generator, so evaluating never changes what training samples next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightrlhf.rewards.scorer import Scorer
from lightrlhf.rl.kl import kl_penalty
from lightrlhf.rollouts.rollout import PolicyRoles, roll_out, sample_responses
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec

Evaluator = Callable[[list[str], list[str]], list[float]]


class PolicyEvaluation:
    def __init__(self, roles: PolicyRoles, scorer: Scorer | None, generation: GenerationSpec, spec: EvalSpec,
                 evaluator: Evaluator | None, forward_batch_size: int | None = None) -> None:
        self.roles, self.scorer, self.generation, self.spec = roles, scorer, generation, spec
        self.evaluator, self.forward_batch_size = evaluator, forward_batch_size
        self._reference_gold: dict[int, list[float]] = {}  # batch index -> gold of the reference's samples

    @property
    def gold_name(self) -> str:
        return getattr(self.evaluator, "name", "gold_score")

    @torch.no_grad()
    def batch(self, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], raw_prompts: Sequence,
              batch_idx: int) -> dict[str, Any]:
        seed = self.spec.seed + batch_idx
        roll = roll_out(self.roles, prompt_ids, prompts, raw_prompts, self.generation,
                        torch.Generator().manual_seed(seed), forward_batch_size=self.forward_batch_size)
        kl = (kl_penalty(roll.logprobs, roll.ref_logprobs, "k1") * roll.mask).sum(1)
        row = {"prompts": list(prompts), "texts": roll.texts, "kl": kl, "lengths": roll.lengths,
               "eos": roll.ended_with_eos.float()}
        if self.scorer is not None:
            row["scores"] = self.scorer.score(roll)[0]
        if self.evaluator is not None:
            row["gold"] = torch.tensor(self.evaluator(list(prompts), roll.texts))
            if batch_idx not in self._reference_gold:
                ref = sample_responses(self.roles, prompt_ids, prompts, raw_prompts, self.generation,
                                       torch.Generator().manual_seed(seed), reference=True)
                self._reference_gold[batch_idx] = self.evaluator(list(prompts), ref.texts)
            row["gold_reference"] = torch.tensor(self._reference_gold[batch_idx])
        return row

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """`eval/*` metrics over every held-out row (see README, "What is logged")."""
        if not rows:
            return {}
        cat: dict[str, Tensor] = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], Tensor)}
        metrics = {"eval/kl": cat["kl"].mean().item(), "eval/length_mean": cat["lengths"].mean().item(),
                   "eval/frac_ended_with_eos": cat["eos"].mean().item()}
        if "scores" in cat:
            metrics["eval/reward"] = cat["scores"].mean().item()
        if "gold" in cat:
            gold, reference = cat["gold"], cat["gold_reference"]
            metrics[f"eval/{self.gold_name}"] = gold.mean().item()
            metrics[f"eval/{self.gold_name}_std"] = gold.std().item() if len(gold) > 1 else 0.0
            wins = (gold > reference).float() + 0.5 * (gold == reference).float()
            metrics["eval/win_rate_vs_sft"] = wins.mean().item()
        return metrics
