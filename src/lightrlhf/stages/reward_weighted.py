"""Reward-weighted fine-tuning: RAFT, ReST, RWR, REINFORCE with a baseline, and the naive `loss * reward`.

One stage for five methods (`stage.method`, conf/stage/reward_weighted.yaml). Each samples k responses
per prompt from the current policy and fine-tunes the policy adapter on those samples with a weighted
NLL (rl/reward_weighted.py); they differ in the weights:

    raft       the best of each prompt's k (Dong et al. 2023), optionally only those >= a batch quantile
    rest       ReST (Gulcehre et al. 2023): the rollout is the Grow set; then one Improve step per
               threshold, each fine-tuning on the samples >= its threshold (quantiles rising, e.g. 0.5,
               0.7, 0.9 of the Grow set's rewards); the next rollout is the next Grow
    rwr        every sample, weighted by exp(r / tau) normalised over the batch or per prompt (Peters &
               Schaal 2007)
    reinforce  every sample, weighted by its advantage r - (mean of the other k-1 rewards of its prompt)
               (Williams 1992, leave-one-out baseline), with an optional beta * KL(pi || pi_ref) in the loss
    naive      every sample, weighted +1 if its raw score beats a fixed threshold, else -1: the literal
               `loss * reward`, kept so that its failure can be watched (policy/nll_negatives grows without
               bound, objective/kl with it, and the held-out gold falls)

One `training_step` is one iteration on a batch of prompts, in the order of the algorithm:

    step 1. roll out    k responses per prompt from the policy, with policy and reference log-probs
                        (rollouts/rollout.py; the reference is the base with the adapter off)
    step 2. score       the scorer's composite score, shaped (rewards/scorer.py): the reward r
    step 3. weights     the method's weight per sample (one set per ReST Improve step)
    step 4. update      per weight set, `update.epochs` passes over the samples it weighs (raft and rest:
                        only the kept ones), minibatches of `update.minibatch_size` rows, exactly one
                        optimizer step per minibatch
    step 5. bookkeeping logs, tripwires

Why each choice:
- Rewards are the shaped score (standardised by the SFT policy's score statistics, clipped, EOS penalty),
  as GRPO's: tau of RWR is then in SFT standard deviations, the same on every task and language, and a
  response cut off without EOS is never "the best". The naive method reads the raw score against its
  threshold, as the seed's exact-match reward reads the answer.
- RAFT and ReST train on the kept samples with the plain SFT loss (token mean over the kept rows); RWR,
  REINFORCE and naive divide sum_i w_i NLL_i by the minibatch's rows times the rollout's mean length, a
  constant, so a minibatch of low weights moves the policy little (and signed weights never make a
  denominator cross zero).
- Log-probs are taken at the sampling temperature (rollouts/rollout.py::scoring_temperature), which at
  the default temperature 1 is the model's own distribution.
- No importance ratio or clipping: every method here is "imitate the (re)weighted samples"; with
  `update.epochs` > 1 the later passes are slightly off-policy, as in RAFT and ReST themselves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightrlhf.data.modules import PromptDataModule
from lightrlhf.models.actor_critic import ActorCritic
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl import masked_mean, token_logprobs
from lightrlhf.rl.group import sequence_kl
from lightrlhf.rl.kl import kl_k3_importance_weighted
from lightrlhf.rl.reward_weighted import (
    NLLNormalizer,
    RWRNormalization,
    above_threshold_mask,
    effective_sample_size,
    leave_one_out_advantages,
    naive_sign_rewards,
    raft_mask,
    rest_thresholds,
    rwr_weights,
    sequence_nll,
    weighted_sequence_nll,
)
from lightrlhf.rollouts.rollout import Rollout, roll_out, scoring_logits, scoring_temperature
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.stages.online import OnlineStage
from lightrlhf.training.alerts import AlertSpec
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.validation import in_range, non_negative, one_of, positive, require

log = logging.getLogger(__name__)

Method = Literal["raft", "rest", "rwr", "reinforce", "naive"]
METHODS = ("raft", "rest", "rwr", "reinforce", "naive")


@dataclass(frozen=True)
class UpdateSpec:
    """How the samples of one iteration are drawn and trained on.

    group_size: k responses per prompt (>= 2 for reinforce: its baseline is the other k-1).
    epochs: passes over each weight set (RAFT's and ReST's fine-tuning epochs on the kept samples).
    minibatch_size: rows per optimizer step (the last minibatch of a pass may be smaller).
    forward_batch_size: rows per forward when measuring the rollout (None = all at once).
    """

    group_size: int = 4
    epochs: int = 2
    minibatch_size: int = 16
    forward_batch_size: int | None = None

    def __post_init__(self) -> None:
        positive("group_size", self.group_size)
        positive("epochs", self.epochs)
        positive("minibatch_size", self.minibatch_size)
        if self.forward_batch_size is not None:
            positive("forward_batch_size", self.forward_batch_size)


@dataclass(frozen=True)
class RaftSpec:
    """quantile: also drop a prompt's best when its reward is under this quantile of the batch's rewards
    (all prompts, all k); None = keep every prompt's best."""

    quantile: float | None = None

    def __post_init__(self) -> None:
        if self.quantile is not None:
            in_range("quantile", self.quantile, 0.0, 1.0)


@dataclass(frozen=True)
class ReSTSpec:
    """quantiles: one Improve step per entry, fine-tuning on the Grow set's samples whose reward is >= that
    quantile of the Grow set's rewards; non-decreasing, each in [0, 1)."""

    quantiles: tuple[float, ...] = (0.5, 0.7, 0.9)

    def __post_init__(self) -> None:
        require(len(self.quantiles) > 0, "quantiles", "must list at least one Improve quantile")
        for q in self.quantiles:
            require(0.0 <= q < 1.0, "quantiles", f"each must be in [0, 1), got {q!r}")
        require(all(b >= a for a, b in zip(self.quantiles, self.quantiles[1:])), "quantiles",
                f"must not decrease (each Improve step filters harder), got {list(self.quantiles)}")


@dataclass(frozen=True)
class RWRSpec:
    """temperature: tau of exp(r / tau), in units of the shaped reward (SFT standard deviations);
    normalization: batch (softmax over all samples) or prompt (softmax within each prompt's k)."""

    temperature: float = 1.0
    normalization: RWRNormalization = "batch"

    def __post_init__(self) -> None:
        positive("temperature", self.temperature)
        one_of("normalization", self.normalization, ("batch", "prompt"))


@dataclass(frozen=True)
class ReinforceSpec:
    """kl_coef: beta of beta * KL(pi || pi_ref) per token in the loss (importance-weighted k3, rl/kl.py); 0 = none."""

    kl_coef: float = 0.05

    def __post_init__(self) -> None:
        non_negative("kl_coef", self.kl_coef)


@dataclass(frozen=True)
class NaiveSpec:
    """threshold: a sample is +1 when its raw composite score is above it, else -1; None = the mean score of
    the initial (SFT) policy, measured before the first rollout."""

    threshold: float | None = None


@dataclass
class WeightSet:
    """One set of per-sample weights and how the loss is normalised with them (ReST has one per Improve step)."""

    name: str
    weights: Tensor  # [N]
    normalizer: NLLNormalizer
    kept_only: bool  # train only on the rows of non-zero weight (0/1 selections)


@dataclass
class WeightedBatch:
    """One iteration's rollout with its rewards and weight sets."""

    rollout: Rollout
    scores: Tensor  # [N] composite score, raw
    rewards: Tensor  # [N] shaped: what the methods rank and weigh by
    components: dict[str, Tensor]
    kl: Tensor  # [N] sum_t (log pi - log pi_ref) over each response
    weight_sets: list[WeightSet]
    thresholds: list[float] = field(default_factory=list)  # ReST's, or naive's one


class RewardWeightedStage(OnlineStage):
    default_metric = "eval/reward"
    stage_name = "reward_weighted"

    def __init__(self, model: ActorCritic, datamodule: PromptDataModule, reward: RewardSpec, method: Method,
                 update: UpdateSpec = UpdateSpec(), raft: RaftSpec = RaftSpec(), rest: ReSTSpec = ReSTSpec(),
                 rwr: RWRSpec = RWRSpec(), reinforce: ReinforceSpec = ReinforceSpec(), naive: NaiveSpec = NaiveSpec(),
                 optim: OptimizerSpec = OptimizerSpec(lr=5e-4),
                 scheduler: SchedulerSpec = SchedulerSpec(name="constant", warmup_steps=0),
                 generation: GenerationSpec | None = None, kl_target: float = 4.0, max_grad_norm: float | None = 1.0,
                 rollouts: int = 100, eval: EvalSpec | None = None, samples_every: int = 10,
                 alerts: AlertSpec | None = None, seed: int = 0, numerics: NumericsSpec | None = None):
        one_of("method", method, METHODS)
        require(not (method == "reinforce" and update.group_size < 2), "update.group_size",
                f"must be >= 2 for method=reinforce (the baseline is the mean of the other k-1 responses to the "
                f"prompt), got {update.group_size}")
        require(not (method == "raft" and update.group_size < 2 and raft.quantile is None), "update.group_size",
                "must be >= 2 for method=raft (the best of one sample is every sample: plain SFT on the "
                f"policy's own samples), got {update.group_size}")
        positive("rollouts", rollouts)
        positive("kl_target", kl_target)
        non_negative("samples_every", samples_every)
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        self.automatic_optimization = False
        self.method, self.update_spec = method, update
        self.raft, self.rest, self.rwr, self.reinforce, self.naive = raft, rest, rwr, reinforce, naive
        self._init_online(model, datamodule, reward, generation, eval, alerts, kl_target, seed,
                          update.forward_batch_size)
        self.rollouts, self.samples_every = rollouts, samples_every
        self.rollout_group_size = update.group_size

    # -- steps 1 to 3: roll out, score, weights -----------------------------------------------------
    def rollout(self, prompt_ids: list[list[int]], prompts: list[str], raw_prompts: list | None = None) -> WeightedBatch:
        k = self.update_spec.group_size
        # step 1. roll out: k responses per prompt, rows p*k .. p*k + k-1, with the reference's log-probs
        roll = roll_out(self.model, prompt_ids, prompts, raw_prompts or prompts, self.generation, self.sampler,
                        group_size=k, forward_batch_size=self.update_spec.forward_batch_size)
        # step 2. score: raw composite score, and the shaped reward the methods rank and weigh by
        scores, components = self.scorer.score(roll)
        self.scorer.observe(scores)
        rewards = self.scorer.shape(scores, roll.ended_with_eos)
        kl = sequence_kl(roll.logprobs, roll.ref_logprobs, roll.mask)
        # step 3. weights
        weight_sets, thresholds = self.weight_sets(rewards.view(-1, k), scores.view(-1, k))
        return WeightedBatch(roll, scores, rewards, components, kl, weight_sets, thresholds)

    def naive_threshold(self) -> float:
        if self.naive.threshold is not None:
            return float(self.naive.threshold)
        if not self.tripwires.baseline:
            raise RuntimeError("the naive threshold defaults to the initial policy's mean score, not measured yet")
        return float(self.tripwires.baseline["score_mean"])

    def weight_sets(self, rewards: Tensor, scores: Tensor) -> tuple[list[WeightSet], list[float]]:
        """[prompts, k] shaped rewards and raw scores -> the method's weight sets (step 3) and thresholds."""
        flat = lambda t: t.reshape(-1).float()  # noqa: E731
        if self.method == "raft":
            return [WeightSet("raft", flat(raft_mask(rewards, self.raft.quantile)), "weighted_tokens", True)], []
        if self.method == "rest":
            thresholds = rest_thresholds(rewards, self.rest.quantiles)
            return [WeightSet(f"improve_{j + 1}", flat(above_threshold_mask(rewards, t)), "weighted_tokens", True)
                    for j, t in enumerate(thresholds)], thresholds.tolist()
        if self.method == "rwr":
            return [WeightSet("rwr", flat(rwr_weights(rewards, self.rwr.temperature, self.rwr.normalization)),
                              "tokens", False)], []
        if self.method == "reinforce":
            return [WeightSet("reinforce", flat(leave_one_out_advantages(rewards)), "tokens", False)], []
        threshold = self.naive_threshold()
        return [WeightSet("naive", flat(naive_sign_rewards(scores, threshold)), "tokens", False)], [threshold]

    # -- step 4: the update -------------------------------------------------------------------------
    def update(self, batch: WeightedBatch) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
        stats: dict[str, list[float]] = {}
        steps = 0
        size = self.update_spec.minibatch_size
        for weight_set in batch.weight_sets:
            rows = (weight_set.weights != 0).nonzero().flatten() if weight_set.kept_only else \
                torch.arange(batch.rollout.rows)
            for _epoch in range(self.update_spec.epochs):
                order = rows[torch.randperm(len(rows), generator=self.sampler)]
                for start in range(0, len(order), size):
                    optimizer.zero_grad()
                    merged = self.minibatch_loss(batch, order[start:start + size], weight_set)
                    steps += self.minibatch_step(optimizer, scheduler, params, torch.tensor([merged["policy/loss"]]),
                                                 merged, stats)
        out = {key: sum(v) / len(v) for key, v in stats.items()}
        out["policy/optimizer_steps"] = float(steps)
        out["numerics/skipped_batches"] = float(self.guard.skipped_total)
        return out

    def minibatch_loss(self, batch: WeightedBatch, idx: Tensor, weight_set: WeightSet) -> dict[str, float]:
        """Backpropagate the weighted NLL of rows `idx` (plus REINFORCE's KL term); its statistics."""
        roll = batch.rollout
        logits = scoring_logits(self.model, roll, idx, group_size=1)
        logp = token_logprobs(logits, roll.responses[idx], scoring_temperature(self.generation))
        mask, weights = roll.mask[idx], weight_set.weights[idx]
        normalizer = weight_set.normalizer
        if normalizer == "tokens":
            # detail: divided by the minibatch's rows times the whole rollout's mean length (a constant of the
            # rollout, not of the minibatch): a per-token scale, and minibatches of low weight move little
            mean_length = roll.mask.sum() / roll.rows
            loss = weighted_sequence_nll(logp, mask, weights, "sequences") / mean_length
        else:
            loss = weighted_sequence_nll(logp, mask, weights, normalizer)
        objective, out = loss, {"policy/loss": loss.item()}
        if self.method == "reinforce" and self.reinforce.kl_coef > 0:
            valid = mask.bool()
            kl_tokens = kl_k3_importance_weighted(torch.where(valid, logp, 0), torch.where(valid, roll.logprobs[idx], 0),
                                                  torch.where(valid, roll.ref_logprobs[idx], 0))
            kl_loss = masked_mean(kl_tokens, mask)
            objective = loss + self.reinforce.kl_coef * kl_loss
            out["policy/kl_loss"] = kl_loss.item()
        self.manual_backward(objective)
        with torch.no_grad():
            nll, lengths = sequence_nll(logp.detach(), mask), mask.sum(dim=-1)
            out["policy/nll"] = (nll.sum() / lengths.sum().clamp(min=1)).item()
            if weight_set.normalizer == "tokens" and self.method in ("reinforce", "naive"):
                # the per-token NLL of the samples pushed down (negative weight) and up: naive's failure shows here
                for name, rows in (("negatives", weights < 0), ("positives", weights > 0)):
                    if rows.any():
                        out[f"policy/nll_{name}"] = (nll[rows].sum() / lengths[rows].sum().clamp(min=1)).item()
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        weighted = self.rollout(batch["prompt_ids"], batch["prompt_text"], self._raw_prompts(batch, train=True))
        if not self.guard.check(self.global_step, scores=weighted.scores, rewards=weighted.rewards):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return  # no update from a poisoned rollout
        rolled = time.perf_counter()
        stats = self.update(weighted)
        updated = time.perf_counter()
        # step 5. bookkeeping: logs and tripwires
        self.publish_rollout(self.rollout_metrics(weighted, stats), weighted.rollout, weighted.scores,
                             (started, rolled, updated))

    def rollout_metrics(self, batch: WeightedBatch, stats: dict[str, float]) -> dict[str, float]:
        roll = batch.rollout
        metrics = {
            "objective/kl": batch.kl.mean().item(),
            "objective/entropy": masked_mean(roll.entropy, roll.mask).item(),
            "objective/scores": batch.scores.mean().item(),
            "objective/nll": -masked_mean(roll.logprobs, roll.mask).item(),
            "reward/score_std": batch.scores.std().item() if batch.scores.numel() > 1 else 0.0,
            "reward/score_shaped": batch.rewards.mean().item(),
            "reward/score_shaped_std": batch.rewards.std().item() if batch.rewards.numel() > 1 else 0.0,
            "reward/length_mean": roll.lengths.mean().item(),
            "reward/frac_ended_with_eos": roll.ended_with_eos.float().mean().item(),
        }
        for weight_set in batch.weight_sets:
            suffix = "" if len(batch.weight_sets) == 1 else f"_{weight_set.name}"
            if weight_set.kept_only:
                metrics[f"weights/kept_fraction{suffix}"] = (weight_set.weights != 0).float().mean().item()
            elif self.method == "rwr":
                ess = effective_sample_size(weight_set.weights).item()
                metrics["weights/ess"], metrics["weights/ess_fraction"] = ess, ess / roll.rows
            else:
                metrics["weights/frac_positive"] = (weight_set.weights > 0).float().mean().item()
                metrics["weights/abs_mean"] = weight_set.weights.abs().mean().item()
        for j, threshold in enumerate(batch.thresholds):
            metrics[f"weights/threshold{'' if len(batch.thresholds) == 1 else f'_{j + 1}'}"] = threshold
        metrics.update({f"reward/components/{name}": v.mean().item() for name, v in batch.components.items()})
        metrics.update(stats)
        return metrics

    # -- optimisation and checkpoints ---------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        spec = self.update_spec
        rows = (self.datamodule.batch_size if self.datamodule is not None else 1) * spec.group_size
        sets = len(self.rest.quantiles) if self.method == "rest" else 1
        # an upper bound (RAFT and ReST train on fewer rows): only a decaying schedule reads it
        total = self.rollouts * sets * spec.epochs * math.ceil(rows / spec.minibatch_size)
        return self.optimizer_and_schedule(self.optim.build(self.named_trainable()), total)

    def stage_state(self) -> dict[str, Any]:
        return self.online_state()

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.load_online_state(state)
