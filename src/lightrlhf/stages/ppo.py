"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022), one rollout per batch.

One `training_step` is one PPO iteration on a batch of prompts, in the order of the algorithm:

    step 1. roll out    sample responses from the policy; policy and reference log-probs, values
                        (rollouts/rollout.py: KV cache, dropout off, no grad)
    step 2. score       the scorer's composite score, shaped (rewards/scorer.py)
    step 3. rewards     r_t = -beta * KL_t, plus the shaped score at the last token
    step 4. advantages  GAE over response tokens, whitened over valid tokens only
    step 5. update      epochs x minibatches, exactly one optimizer step per minibatch
    step 6. bookkeeping logs (with the beta this rollout used), adaptive beta, tripwires

Lightning runs the loop (`automatic_optimization = False`): its `global_step` counts optimizer
steps, the rollout counter is logged separately, and the stage's own state -- KL coefficient,
reward normaliser, sampler RNG, rollout counter, the SFT baseline -- goes into every checkpoint.

Evaluation (Lightning's validation loop over held-out prompts, every `trainer.val_check_interval`
rollouts and at the start, rollouts/evaluation.py): mean score, KL to the reference, and with an
evaluator (the demo) the hidden gold score and the win rate against the initial (SFT) policy's
samples for the same prompts and seed.
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
from lightrlhf.models.shared_prompt import checkpointing
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl import (
    aggregation_normalizer,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_objective,
    token_logprobs,
    value_objective,
)
from lightrlhf.rl.kl_control import KLSpec
from lightrlhf.rollouts.rollout import Rollout, response_logit_positions, roll_out, scoring_temperature
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.stages.online import OnlineStage, merge_micro_batches
from lightrlhf.training import distributed
from lightrlhf.training.alerts import AlertSpec
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.validation import in_range, non_negative, one_of, positive, require

log = logging.getLogger(__name__)


@dataclass
class PPOBatch:
    """One PPO iteration's rollout with its rewards and advantages; [N, R] over response tokens."""

    rollout: Rollout
    scores: Tensor  # [N] composite score, raw
    shaped: Tensor  # [N] after normalisation, clipping and the EOS penalty
    components: dict[str, Tensor]
    kl: Tensor  # [N, R] per-token KL estimate (masked)
    kl_coef: float  # the beta the rewards were built with
    rewards: Tensor
    advantages: Tensor
    returns: Tensor


@dataclass(frozen=True)
class PPOSpec:
    """The update: `epochs` passes over each rollout batch in `num_minibatches` minibatches, one
    optimizer step per minibatch (micro-batches of `micro_batch_size` accumulate inside one, each
    normalised by the whole minibatch's token or row count, so they add up to the minibatch's loss).

    clip_range: policy ratio clip epsilon (Schulman et al. 2017, eq. 7).
    value_clip_range: clip of the value update around the rollout's values.
    vf_coef: weight of the value loss; entropy_coef: entropy bonus (0 = off).
    gamma, lam: GAE discount and trace decay (Schulman et al. 2016); gamma = 1 for RLHF's single reward.
    max_approx_kl: stop the rollout's update at the first minibatch whose approx-KL to the rollout policy
      exceeds this, without taking that minibatch's step (as Stable-Baselines3's target_kl).
    loss_aggregation: token_mean (every token weighs the same) or seq_mean (every response does).
    forward_batch_size: rows per forward when scoring a rollout (bounds memory; None = all at once).
    """

    epochs: int = 4
    num_minibatches: int = 2
    micro_batch_size: int | None = None
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_approx_kl: float | None = None
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    forward_batch_size: int | None = None

    def __post_init__(self) -> None:
        positive("epochs", self.epochs)
        positive("num_minibatches", self.num_minibatches)
        if self.micro_batch_size is not None:
            positive("micro_batch_size", self.micro_batch_size)
        positive("clip_range", self.clip_range)
        positive("value_clip_range", self.value_clip_range)
        non_negative("vf_coef", self.vf_coef)
        non_negative("entropy_coef", self.entropy_coef)
        in_range("gamma", self.gamma, 0.0, 1.0)
        in_range("lam", self.lam, 0.0, 1.0)
        if self.max_approx_kl is not None:
            positive("max_approx_kl", self.max_approx_kl)
        one_of("loss_aggregation", self.loss_aggregation, ("token_mean", "seq_mean"))
        if self.forward_batch_size is not None:
            positive("forward_batch_size", self.forward_batch_size)


def check_minibatches(batch_size: int, ppo: PPOSpec) -> None:
    require(batch_size % ppo.num_minibatches == 0, "ppo.num_minibatches",
            f"must divide the rollout batch (stage.datamodule.batch_size={batch_size}), got {ppo.num_minibatches}")
    if ppo.micro_batch_size is not None:
        minibatch = batch_size // ppo.num_minibatches
        require(minibatch % ppo.micro_batch_size == 0, "ppo.micro_batch_size",
                f"must divide the minibatch ({minibatch} rows), got {ppo.micro_batch_size}")


class PPOStage(OnlineStage):
    default_metric = "eval/reward"
    stage_name = "ppo"
    data_parallel = "stage"  # runs under trainer=ddp (training/distributed.py)

    def __init__(self, model: ActorCritic, datamodule: PromptDataModule, reward: RewardSpec,
                 optim: OptimizerSpec = OptimizerSpec(lr=5e-4),
                 scheduler: SchedulerSpec = SchedulerSpec(name="constant", warmup_steps=0),
                 generation: GenerationSpec | None = None, kl: KLSpec | None = None, ppo: PPOSpec | None = None,
                 max_grad_norm: float | None = 1.0,
                 value_lr_scale: float = 1.0, rollouts: int = 100, exploration_epsilon: float = 0.0,
                 eval: EvalSpec | None = None, samples_every: int = 10, alerts: AlertSpec | None = None,
                 seed: int = 0, numerics: NumericsSpec | None = None):
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        self.automatic_optimization = False
        positive("value_lr_scale", value_lr_scale)
        positive("rollouts", rollouts)
        in_range("exploration_epsilon", exploration_epsilon, 0.0, 1.0)
        non_negative("samples_every", samples_every)
        if not model.has_critic:
            raise ValueError("PPO needs a critic: build the model with load_actor_critic(critic=true)")
        self.kl_spec, self.ppo = kl or KLSpec(), ppo or PPOSpec()
        self._init_online(model, datamodule, reward, generation, eval, alerts, self.kl_spec.target, seed,
                          self.ppo.forward_batch_size)
        if datamodule is not None:
            check_minibatches(datamodule.batch_size, self.ppo)
        self.value_lr_scale, self.rollouts = value_lr_scale, rollouts
        self.exploration_epsilon, self.samples_every = exploration_epsilon, samples_every
        self.kl_controller = self.kl_spec.controller()  # checkpointed with the online state
        # detail: with one minibatch of the whole rollout in one micro-batch, the first epoch's policy and
        # value forwards are the rollout's own (same weights, same rows, dropout off: the first ratio is
        # exactly 1 either way), so the rollout runs them with gradient and the first minibatch
        # backpropagates them: two forwards fewer per rollout. Not under activation checkpointing: its
        # recomputation in the backward would run with whichever adapter is active then.
        self.reuse_rollout_forward = (self.ppo.num_minibatches == 1 and self.ppo.micro_batch_size is None
                                      and self.ppo.forward_batch_size is None and not checkpointing(model.module))

    # -- steps 1 to 4: roll out, score, per-token rewards, advantages ------------------------------
    def rollout(self, prompt_ids: list[list[int]], prompts: list[str], raw_prompts: list | None = None) -> PPOBatch:
        # step 1. roll out: sample from the policy (exploration may mix in reference tokens)
        roll = roll_out(self.model, prompt_ids, prompts, raw_prompts or prompts, self.generation, self.sampler,
                        forward_batch_size=self.ppo.forward_batch_size, with_values=True,
                        explore_epsilon=self.exploration_epsilon, differentiable=self.reuse_rollout_forward,
                        entropy_graph=self.ppo.entropy_coef != 0)
        # step 2. score: the composite score in raw units, then shaped
        scores, components = self.scorer.score(roll)
        self.scorer.observe(distributed.all_cat(scores))  # the normaliser's statistics: every rank's scores
        shaped = self.scorer.shape(scores, roll.ended_with_eos)
        # step 3. per-token rewards: -beta * KL_t everywhere, the shaped score at the last token
        kl = kl_penalty(roll.logprobs, roll.ref_logprobs, self.kl_spec.estimator) * roll.mask
        beta = self.kl_controller.value
        rewards = per_token_rewards(shaped, kl, roll.mask, beta)
        # step 4. advantages: GAE, whitened over valid tokens only (every rank's)
        advantages, returns = gae(rewards, roll.values, roll.mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, roll.mask, total=distributed.all_sum)
        return PPOBatch(roll, scores, shaped, components, kl, beta, rewards, advantages, returns)

    # -- step 5: the update ------------------------------------------------------------------------
    def update(self, batch: PPOBatch) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        rows = batch.rollout.rows
        minibatch = rows // self.ppo.num_minibatches
        micro = self.ppo.micro_batch_size or minibatch
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        stats: dict[str, list[float]] = {}
        steps = 0
        for epoch in range(self.ppo.epochs):
            order = torch.randperm(rows, generator=self.sampler)
            stop = False
            for start in range(0, rows, minibatch):
                chosen = order[start:start + minibatch]
                reuse = epoch == 0 and batch.rollout.logprobs_graph is not None  # reuse_rollout_forward
                # detail: every micro-batch is normalised by the whole minibatch's count (valid tokens,
                # or rows for seq_mean) over every rank, so the micro-batch losses add up to the global
                # minibatch's loss (and the gradients, summed over ranks, to its gradient).
                normalizer = distributed.all_sum(aggregation_normalizer(batch.rollout.mask[chosen],
                                                                        self.ppo.loss_aggregation))
                optimizer.zero_grad()
                parts = [self._loss(batch, chosen[i:i + micro], normalizer, reuse) for i in range(0, len(chosen), micro)]
                parts = [part for rank_parts in distributed.all_gather_objects(parts) for part in rank_parts]
                merged = merge_micro_batches(parts, additive=("policy/loss", "policy/entropy", "val/loss"))
                if self.ppo.max_approx_kl is not None and merged["policy/approxkl"] > self.ppo.max_approx_kl:
                    # detail: early stop -- the policy already moved too far from the rollout policy;
                    # this minibatch's step is not taken, nor any after it.
                    optimizer.zero_grad()
                    stop = True
                    break
                losses = torch.tensor([merged["policy/loss"], merged["val/loss"]])
                steps += self.minibatch_step(optimizer, scheduler, params, losses, merged, stats)
            if stop:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/optimizer_steps"] = float(steps)
        out["policy/early_stopped"] = float(stop)
        out["numerics/skipped_batches"] = float(self.guard.skipped_total)
        return out

    def _loss(self, batch: PPOBatch, idx: Tensor, normalizer: Tensor, reuse: bool = False) -> dict[str, float]:
        """Backpropagate one micro-batch's share of the minibatch loss; its statistics with token weights.
        `reuse`: `idx` is every row of the rollout, whose forwards with gradient are this one's."""
        roll, spec = batch.rollout, self.ppo
        temperature = scoring_temperature(self.generation)
        seq, attn, mask = roll.sequences[idx], roll.attention_mask[idx], roll.mask[idx]
        if reuse:
            logprobs = roll.logprobs_graph[idx]
            entropy = roll.entropy_graph[idx] if spec.entropy_coef else roll.entropy[idx]
        else:
            logits = self.model.policy_logits(seq, attn, last=response_logit_positions(roll))[:, :-1]
            logprobs = token_logprobs(logits, roll.responses[idx], temperature)
            # detail: without an entropy bonus the entropy is only a statistic: taken off the graph, its
            # [rows, tokens, vocabulary] softmax and products are freed at once instead of held for the
            # backward (at GPT-2's 50k vocabulary, ~0.6 GB a 16-row minibatch)
            entropy = entropy_from_logits(logits if spec.entropy_coef else logits.detach(), temperature)
        policy = policy_objective(logprobs, entropy, roll.logprobs[idx], batch.advantages[idx],
                                  mask, clip_range=spec.clip_range, entropy_coef=spec.entropy_coef,
                                  aggregation=spec.loss_aggregation, normalizer=normalizer)
        # detail: the policy loss is backpropagated before the value pass switches the active adapter,
        # so gradient-checkpoint recomputation runs each role with its own adapter.
        self.manual_backward(policy.objective)
        values = roll.values_graph[idx] if reuse else self.model.values(seq, attn)[:, roll.prompt_width - 1:-1]
        value = value_objective(values, roll.values[idx], batch.returns[idx], mask, clip_range=spec.value_clip_range,
                                vf_coef=spec.vf_coef, aggregation=spec.loss_aggregation, normalizer=normalizer)
        self.manual_backward(value.objective)
        return {"tokens": mask.sum().item(),
                # shares of the minibatch loss: they add up over micro-batches
                "policy/loss": policy.policy.loss.item(), "policy/entropy": policy.entropy.item(),
                "val/loss": value.value.loss.item(),
                # micro-batch means over tokens: weighted by token count when merged
                "policy/clipfrac": policy.policy.clipfrac.item(), "policy/approxkl": policy.policy.approxkl.item(),
                "policy/ratio_mean": policy.policy.ratio_mean.item(), "val/clipfrac": value.value.clipfrac.item()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        ppo_batch = self.rollout(batch["prompt_ids"], batch["prompt_text"], self._raw_prompts(batch, train=True))
        roll = ppo_batch.rollout
        if not self.rollout_is_finite(scores=ppo_batch.scores, rewards=ppo_batch.rewards,
                                      advantages=ppo_batch.advantages, values=roll.values):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return  # no update from a poisoned rollout
        rolled = time.perf_counter()
        stats = self.update(ppo_batch)
        updated = time.perf_counter()
        # step 6. bookkeeping: logs (with this rollout's beta), adaptive beta, tripwires
        metrics = self.rollout_metrics(ppo_batch, stats)
        kl_and_rows = distributed.all_sum(torch.stack([ppo_batch.kl.sum(), torch.tensor(float(roll.rows))]))
        self.kl_controller.update((kl_and_rows[0] / kl_and_rows[1]).item(), n_steps=int(kl_and_rows[1]))
        self.publish_rollout(metrics, roll, ppo_batch.scores, (started, rolled, updated))

    def rollout_metrics(self, batch: PPOBatch, stats: dict[str, float]) -> dict[str, float]:
        roll, mask = batch.rollout, batch.rollout.mask
        kl_sum = batch.kl.sum(1)
        non_score = -batch.kl_coef * kl_sum
        metrics = {
            "objective/kl": kl_sum.mean().item(),
            "objective/kl_coef": float(batch.kl_coef),
            "objective/entropy": masked_mean(roll.entropy, mask).item(),
            "objective/scores": batch.scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (batch.shaped + non_score).mean().item(),
            "reward/score_shaped": batch.shaped.mean().item(),
            "reward/length_mean": roll.lengths.mean().item(),
            "reward/frac_ended_with_eos": roll.ended_with_eos.float().mean().item(),
            "val/explained_variance": explained_variance(roll.values, batch.returns, mask).item(),
            "val/value_mean": masked_mean(roll.values, mask).item(),
            "val/returns_mean": masked_mean(batch.returns, mask).item(),
        }
        metrics.update({f"reward/components/{k}": v.mean().item() for k, v in batch.components.items()})
        metrics.update(stats)
        return metrics

    # -- optimisation and checkpoints --------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        policy = {f"model.{n}" for n in self.model.policy_parameter_names()}
        groups = (self.optim.build(self.named_trainable(lambda n: n in policy)) +
                  self.optim.build(self.named_trainable(lambda n: n not in policy), self.value_lr_scale))
        return self.optimizer_and_schedule(groups, self.rollouts * self.ppo.epochs * self.ppo.num_minibatches)

    def stage_state(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_controller.state_dict(), **self.online_state()}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.load_online_state(state)
