"""GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025) and RLOO (Ahmadian et al. 2024): critic-free
policy optimisation with group baselines, one stage for all three (`conf/stage/grpo.yaml`, `rloo.yaml`).

One `training_step` is one iteration on a batch of prompts, in the order of the algorithm:

    step 1. roll out    k = group.group_size responses per prompt from the policy, with policy and
                        reference log-probs (rollouts/rollout.py; no critic, no value adapter)
    step 2. score       the scorer's composite score, shaped (rewards/scorer.py)
    step 3. rewards     r_i = shaped score, minus beta * KL_i (k1 summed over the response) when kl.kl_in=reward
    step 4. advantages  group baseline (rl/group.py): grpo = (r - mean_g) / (std_g + eps) [or r - mean_g
                        with scale_rewards=false: Dr. GRPO], rloo = r - mean of the other k-1
    step 5. update      num_iterations passes x num_minibatches, exactly one optimizer step per minibatch,
                        on the clipped surrogate (+ beta * importance-weighted k3 when kl.kl_in=loss)
    step 6. bookkeeping logs, tripwires

Why each choice:
- The reference is the base with the adapter off, so the ratio is exactly 1 and the KL exactly 0 on the
  first update (tested); num_iterations > 1 reuses one rollout, the ratio then moves and is clipped.
- KL in the loss uses k3 times the ratio to the rollout policy: plain k3 has the gradient of the reverse
  KL (rl/kl.py). KL in the reward uses k1 summed over the response, the sequence-level KL whose score-
  function gradient is unbiased; there it is part of the reward the group compares.
- Rewards are the scorer's shaped score (standardised by the SFT policy's statistics, clipped, EOS penalty),
  as PPO sees them. The group baseline removes the mean anyway; the SFT units keep beta comparable with PPO's.
- Diagnostics are PPO's (objective/kl, objective/entropy, reward/length_mean, reward/frac_ended_with_eos,
  tripwires, held-out eval with the gold score on the demo), plus group/* (reward spread within groups,
  fraction of groups with nothing to learn).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightrlhf.data.modules import PromptDataModule
from lightrlhf.models.actor_critic import ActorCritic
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl import aggregation_normalizer, masked_mean, token_logprobs
from lightrlhf.rl.group import (
    Baseline,
    fraction_zero_std_groups,
    group_advantages,
    group_policy_objective,
    group_reward_std,
    sequence_kl,
)
from lightrlhf.rl.ppo import AGGREGATIONS, Aggregation
from lightrlhf.rollouts.rollout import Rollout, group_order, roll_out, scoring_logits, scoring_temperature
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.stages.online import OnlineStage, merge_micro_batches
from lightrlhf.training import distributed
from lightrlhf.training.alerts import AlertSpec
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.validation import non_negative, one_of, positive, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    """The group baseline and the update (see module docstring).

    baseline: grpo (group mean, optionally / group std) or rloo (leave-one-out mean); required, it is what
      distinguishes grpo.yaml from rloo.yaml.
    scale_rewards: grpo only: divide by the group's std (GRPO) or not (Dr. GRPO); RLOO never scales.
    group_size: k responses per prompt (>= 2: a group of one has no baseline).
    num_iterations: passes over each rollout (GRPO's mu); > 1 reuses it with the clipped ratio.
    num_minibatches: minibatches per pass, one optimizer step each; micro_batch_size: rows per backward.
    clip_range: ratio clip epsilon; loss_aggregation: token_mean, seq_mean or dr_grpo (rl/ppo.py::aggregate).
    forward_batch_size: rows per forward when scoring a rollout (None = all at once).
    """

    baseline: Baseline
    scale_rewards: bool
    group_size: int = 4
    num_iterations: int = 2
    num_minibatches: int = 2
    micro_batch_size: int | None = None
    clip_range: float = 0.2
    loss_aggregation: Aggregation = "token_mean"
    forward_batch_size: int | None = None

    def __post_init__(self) -> None:
        one_of("baseline", self.baseline, ("grpo", "rloo"))
        require(not (self.baseline == "rloo" and self.scale_rewards), "scale_rewards",
                "RLOO's leave-one-out baseline is never scaled by the group std; set it to false (or baseline=grpo)")
        require(self.group_size >= 2, "group_size",
                f"must be >= 2 (a group baseline compares the k responses to one prompt), got {self.group_size!r}")
        positive("num_iterations", self.num_iterations)
        positive("num_minibatches", self.num_minibatches)
        if self.micro_batch_size is not None:
            positive("micro_batch_size", self.micro_batch_size)
        positive("clip_range", self.clip_range)
        one_of("loss_aggregation", self.loss_aggregation, AGGREGATIONS)
        if self.forward_batch_size is not None:
            positive("forward_batch_size", self.forward_batch_size)


@dataclass(frozen=True)
class GroupKLSpec:
    """beta * KL(pi || pi_ref): `kl_in=reward` subtracts beta * sum_t k1_t from each response's reward;
    `kl_in=loss` adds beta * importance-weighted k3 to the loss (rl/kl.py); coef = 0 turns it off.
    target: nats per response the KL alert is scaled by (alerts.kl_multiple x target).
    measure: at coef = 0, still run the reference's forward to log objective/kl and arm the KL alert;
    false skips that forward (about a tenth of an iteration), as trl does at beta = 0."""

    coef: float = 0.05
    kl_in: Literal["reward", "loss"] = "reward"
    target: float = 4.0
    measure: bool = True

    @property
    def needs_reference(self) -> bool:
        return self.coef > 0 or self.measure

    def __post_init__(self) -> None:
        non_negative("coef", self.coef)
        one_of("kl_in", self.kl_in, ("reward", "loss"))
        positive("target", self.target)


@dataclass
class GroupBatch:
    """One iteration's rollout (k rows per prompt) with its rewards and advantages."""

    rollout: Rollout
    scores: Tensor  # [N] composite score, raw
    shaped: Tensor  # [N] after normalisation, clipping and the EOS penalty
    components: dict[str, Tensor]
    kl: Tensor | None  # [N] sum_t k1_t over each response; None when the reference is not run
    rewards: Tensor  # [N] what the group baseline compares
    advantages: Tensor  # [N]


def check_group_minibatches(batch_size: int, group: GroupSpec) -> None:
    rows = batch_size * group.group_size
    require(rows % group.num_minibatches == 0, "group.num_minibatches",
            f"must divide the rollout's rows (stage.datamodule.batch_size x group_size = {rows}), "
            f"got {group.num_minibatches}")
    if group.micro_batch_size is not None:
        minibatch = rows // group.num_minibatches
        require(minibatch % group.micro_batch_size == 0, "group.micro_batch_size",
                f"must divide the minibatch ({minibatch} rows), got {group.micro_batch_size}")


class GRPOStage(OnlineStage):
    default_metric = "eval/reward"
    data_parallel = "stage"  # runs under trainer=ddp: a group never spans ranks (training/distributed.py)

    def __init__(self, model: ActorCritic, datamodule: PromptDataModule, reward: RewardSpec, group: GroupSpec,
                 optim: OptimizerSpec = OptimizerSpec(lr=5e-4),
                 scheduler: SchedulerSpec = SchedulerSpec(name="constant", warmup_steps=0),
                 generation: GenerationSpec | None = None, kl: GroupKLSpec | None = None,
                 max_grad_norm: float | None = 1.0, rollouts: int = 100, eval: EvalSpec | None = None,
                 samples_every: int = 10, alerts: AlertSpec | None = None, seed: int = 0,
                 numerics: NumericsSpec | None = None):
        self.stage_name = group.baseline  # before the base class builds its guard: it names the stage
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        self.automatic_optimization = False
        positive("rollouts", rollouts)
        non_negative("samples_every", samples_every)
        self.group, self.kl_spec = group, kl or GroupKLSpec()
        self._init_online(model, datamodule, reward, generation, eval, alerts, self.kl_spec.target, seed,
                          group.forward_batch_size)
        if datamodule is not None:
            check_group_minibatches(datamodule.batch_size, group)
        self.rollouts, self.samples_every = rollouts, samples_every
        self.rollout_group_size = group.group_size
        # detail: one pass of one minibatch, all rows in one backward (trl's default num_iterations=1):
        # the update's forward is the rollout's policy forward (same weights, same rows, dropout off),
        # so the rollout runs it with gradient and the update backpropagates it instead of a second one.
        self.reuse_rollout_forward = (group.num_iterations == 1 and group.num_minibatches == 1
                                      and group.micro_batch_size is None and group.forward_batch_size is None)

    # -- steps 1 to 4: roll out, score, rewards, group advantages ----------------------------------
    def rollout(self, prompt_ids: list[list[int]], prompts: list[str], raw_prompts: list | None = None) -> GroupBatch:
        spec, k = self.group, self.group.group_size
        # step 1. roll out: k responses per prompt, rows p*k .. p*k + k-1
        roll = roll_out(self.model, prompt_ids, prompts, raw_prompts or prompts, self.generation, self.sampler,
                        group_size=k, forward_batch_size=spec.forward_batch_size,
                        differentiable=self.reuse_rollout_forward, with_reference=self.kl_spec.needs_reference)
        # step 2. score: the composite score in raw units, then shaped
        scores, components = self.scorer.score(roll)
        self.scorer.observe(distributed.all_cat(scores))  # the normaliser's statistics: every rank's scores
        shaped = self.scorer.shape(scores, roll.ended_with_eos)
        # step 3. rewards: the KL of each whole response (k1), in the reward when kl_in=reward
        kl = sequence_kl(roll.logprobs, roll.ref_logprobs, roll.mask) if roll.ref_logprobs is not None else None
        rewards = shaped - self.kl_spec.coef * kl if self.kl_spec.kl_in == "reward" and kl is not None else shaped
        # step 4. advantages: each response against the other responses to its prompt
        advantages = group_advantages(rewards, k, spec.baseline, spec.scale_rewards)
        return GroupBatch(roll, scores, shaped, components, kl, rewards, advantages)

    # -- step 5: the update ------------------------------------------------------------------------
    def update(self, batch: GroupBatch) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        rows = batch.rollout.rows
        minibatch = rows // self.group.num_minibatches
        micro = self.group.micro_batch_size or minibatch
        params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
        stats: dict[str, list[float]] = {}
        steps = 0
        k = self.group.group_size
        # detail: minibatches of whole groups let each forward run a group's prompt once (as the rollout's
        # did, so the first ratio is exactly 1, not 1 up to rounding); their advantages sum to zero per group.
        by_group = minibatch % k == 0 and micro % k == 0
        for _iteration in range(self.group.num_iterations):
            order = group_order(rows, k, self.sampler) if by_group else torch.randperm(rows, generator=self.sampler)
            for start in range(0, rows, minibatch):
                chosen = order[start:start + minibatch]
                # detail: every micro-batch divides by the whole minibatch's count, so they add up to its loss
                # (over every rank: the gradients, summed over ranks, are the global minibatch's)
                normalizer = distributed.all_sum(aggregation_normalizer(
                    batch.rollout.mask[chosen], self.group.loss_aggregation, self.generation.max_new_tokens))
                optimizer.zero_grad()
                parts = [self._loss(batch, chosen[i:i + micro], normalizer, by_group)
                         for i in range(0, len(chosen), micro)]
                parts = [part for rank_parts in distributed.all_gather_objects(parts) for part in rank_parts]
                merged = merge_micro_batches(parts, additive=("policy/loss", "policy/kl_loss"))
                losses = torch.tensor([merged["policy/loss"]])
                steps += self.minibatch_step(optimizer, scheduler, params, losses, merged, stats)
        out = {key: sum(v) / len(v) for key, v in stats.items()}
        out["policy/optimizer_steps"] = float(steps)
        out["numerics/skipped_batches"] = float(self.guard.skipped_total)
        return out

    def _loss(self, batch: GroupBatch, idx: Tensor, normalizer: Tensor, by_group: bool) -> dict[str, float]:
        """Backpropagate one micro-batch's share of the minibatch loss; its statistics with token weights.
        `by_group`: `idx` holds whole groups in order (the prompt runs once per group)."""
        roll = batch.rollout
        if roll.logprobs_graph is not None:  # the rollout's forward is this one (reuse_rollout_forward)
            logp = roll.logprobs_graph[idx]
        else:
            logits = scoring_logits(self.model, roll, idx, group_size=None if by_group else 1)
            logp = token_logprobs(logits, roll.responses[idx], scoring_temperature(self.generation))
        kl_coef = self.kl_spec.coef if self.kl_spec.kl_in == "loss" else 0.0
        # none is run at kl.coef=0 with kl.measure=false; the objective reads it only when kl_coef > 0
        ref_logprobs = roll.ref_logprobs[idx] if roll.ref_logprobs is not None else None
        out = group_policy_objective(logp, roll.logprobs[idx], ref_logprobs, batch.advantages[idx],
                                     roll.mask[idx], clip_range=self.group.clip_range, kl_coef=kl_coef,
                                     aggregation=self.group.loss_aggregation, normalizer=normalizer)
        self.manual_backward(out.objective)
        return {"tokens": roll.mask[idx].sum().item(),
                # shares of the minibatch loss: they add up over micro-batches
                "policy/loss": out.policy.loss.item(), "policy/kl_loss": out.kl.item(),
                # micro-batch means over tokens: weighted by token count when merged
                "policy/clipfrac": out.policy.clipfrac.item(), "policy/approxkl": out.policy.approxkl.item(),
                "policy/ratio_mean": out.policy.ratio_mean.item()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        group_batch = self.rollout(batch["prompt_ids"], batch["prompt_text"], self._raw_prompts(batch, train=True))
        roll = group_batch.rollout
        if not self.rollout_is_finite(scores=group_batch.scores, rewards=group_batch.rewards,
                                      advantages=group_batch.advantages):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return  # no update from a poisoned rollout
        rolled = time.perf_counter()
        stats = self.update(group_batch)
        updated = time.perf_counter()
        # step 6. bookkeeping: logs and tripwires
        metrics = self.rollout_metrics(group_batch, stats)
        self.publish_rollout(metrics, roll, group_batch.scores, (started, rolled, updated))

    def rollout_metrics(self, batch: GroupBatch, stats: dict[str, float]) -> dict[str, float]:
        roll, k = batch.rollout, self.group.group_size
        in_reward = self.kl_spec.kl_in == "reward" and batch.kl is not None
        non_score = -self.kl_spec.coef * batch.kl if in_reward else torch.zeros_like(batch.rewards)
        # without a reference forward (kl.coef=0, kl.measure=false) there is no KL to log, not a KL of 0
        metrics = {} if batch.kl is None else {"objective/kl": batch.kl.mean().item()}
        metrics |= {
            "objective/kl_coef": float(self.kl_spec.coef),
            "objective/entropy": masked_mean(roll.entropy, roll.mask).item(),
            "objective/scores": batch.scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": batch.rewards.mean().item(),
            "reward/score_shaped": batch.shaped.mean().item(),
            "reward/length_mean": roll.lengths.mean().item(),
            "reward/frac_ended_with_eos": roll.ended_with_eos.float().mean().item(),
            "group/reward_std": group_reward_std(batch.rewards, k).item(),
            "group/frac_zero_std": fraction_zero_std_groups(batch.rewards, k).item(),
            "group/advantage_abs_mean": batch.advantages.abs().mean().item(),
        }
        metrics.update({f"reward/components/{name}": v.mean().item() for name, v in batch.components.items()})
        metrics.update(stats)
        return metrics

    # -- optimisation and checkpoints --------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        total = self.rollouts * self.group.num_iterations * self.group.num_minibatches
        return self.optimizer_and_schedule(self.optim.build(self.named_trainable()), total)

    def stage_state(self) -> dict[str, Any]:
        return self.online_state()

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.load_online_state(state)
