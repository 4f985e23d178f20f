"""Reward-weighted fine-tuning of a masked LM on its own sampled infills (`stage=reward_weighted_mlm`).

The causal stage (`stage=reward_weighted`) imitates its own best samples through their exact log-
likelihood. A masked LM (`model=tiny_bert_zh`) writes a response by mask-predict into a slot behind the
prompt (models/masked_lm.py), and its log-likelihood has no closed form, so this stage uses an
estimate of it (rl/infill_likelihood.py). One `training_step` is one iteration on a batch of prompts:

    step 1. sample     k = weighting.group_size infills per prompt by mask-predict (no gradient, the
                       run's seeded sampler)
    step 2. score      the scorer's composite score (rewards/scorer.py: a reward-model export, which
                       may sit on another base and tokenizer -- it reads the text -- and/or Python
                       reward functions), shaped as the online stages shape it: standardised by the
                       start model's statistics, clipped, minus the penalty for a slot without [SEP]
    step 3. weights    from the k shaped scores of each prompt (rl/reward_weighted.py): raft (the best
                       of k, weight 1), rwr (k * softmax(r / tau) within the prompt) or reinforce
                       (r minus the mean of the other k - 1, the leave-one-out baseline)
    step 4. update     updates_per_rollout optimizer steps, each on the weighted NLL
                       L = sum_i w_i * (-log^pi(y_i | x_i)) / Z with the chosen estimate log^pi (a fresh
                       draw of the masking for `elbo`); Z counts L slot positions per row, so every
                       response weighs the same whatever its length
    step 5. bookkeeping logs

Evaluation (Lightning's validation loop, and once before the first iteration): mask-predict on the
held-out prompts with a fixed seed; eval/reward (the scorer's raw score), eval/gold_score (the data
config's evaluator, the demo's hidden gold), eval/drift (how far the model moved from where it
started: sum over the slot of KL(p_theta(. | x, [MASK]^L) || p_start(. | x, [MASK]^L)), the first
mask-predict step's distributions, nats per response), length and the share of slots that ended.

Why LoRA on the frozen start model: the start model is then the adapter switched off, so the drift is
measured against exactly it, for free, and checkpoints hold only the adapter (as in every stage).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightrlhf.data.modules import PromptDataModule
from lightrlhf.models.masked_lm import (
    InfillBatch,
    MaskedLM,
    MaskPredictSpec,
    banned_ids,
    decode_slots,
    export_masked_lm,
    mask_predict,
    masked_prompts,
    response_lengths,
)
from lightrlhf.rewards.scorer import Scorer
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl.infill_likelihood import draw_masking, elbo_terms, one_step_terms
from lightrlhf.rl.reward_weighted import leave_one_out_advantages, raft_mask, rwr_weights, weighted_sequence_nll
from lightrlhf.rollouts.rollout import chunks, repeat_each
from lightrlhf.rollouts.specs import EvalSpec
from lightrlhf.stages.base import StageModule
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.training.reporting import log_data_summary, log_sample_table
from lightrlhf.validation import in_range, non_negative, one_of, positive, require

log = logging.getLogger(__name__)
METHODS = ("raft", "rwr", "reinforce")
LIKELIHOODS = ("elbo", "one_step")


@dataclass(frozen=True)
class WeightingSpec:
    """Which infills to imitate and how much (see module docstring, step 3).

    method: raft, rwr or reinforce.  group_size: k infills per prompt (>= 2).
    rwr_temperature: tau of rwr's exp(r / tau), in the shaped score's units (the start model's std).
    raft_quantile: raft keeps a prompt's best only if it reaches this quantile of the batch (null: always).
    """

    method: Literal["raft", "rwr", "reinforce"] = "raft"
    group_size: int = 8
    rwr_temperature: float = 1.0
    raft_quantile: float | None = None

    def __post_init__(self) -> None:
        one_of("method", self.method, METHODS)
        require(self.group_size >= 2, "group_size", f"must be >= 2 (the weights compare the k infills of a "
                                                    f"prompt), got {self.group_size!r}")
        positive("rwr_temperature", self.rwr_temperature)
        if self.raft_quantile is not None:
            in_range("raft_quantile", self.raft_quantile, 0.0, 1.0)

    def weights(self, shaped: Tensor) -> Tensor:
        """[N] weights of the N = prompts * k infills (rows p*k .. p*k + k - 1 answer prompt p)."""
        grouped = shaped.view(-1, self.group_size)
        if self.method == "raft":
            return raft_mask(grouped, self.raft_quantile).float().reshape(-1)
        if self.method == "rwr":
            return rwr_weights(grouped, self.rwr_temperature, "prompt").reshape(-1)
        return leave_one_out_advantages(grouped).reshape(-1)

    @property
    def normalizer(self) -> str:
        # REINFORCE's weights have either sign: a weighted token count could be 0 or negative
        return "tokens" if self.method == "reinforce" else "weighted_tokens"


@dataclass
class Infills:
    """k infills per prompt, scored: what the scorer reads (rewards/scorer.py::Samples) and more."""

    batch: InfillBatch  # the completed rows
    slots: Tensor  # [N, L]
    texts: list[str]
    ended: Tensor  # [N] bool: the slot holds a [SEP]
    lengths: Tensor  # [N]
    prompts: list[str]
    raw_prompts: list

    @property
    def sequences(self) -> Tensor:
        return self.batch.input_ids

    @property
    def attention_mask(self) -> Tensor:
        return self.batch.attention_mask


class MaskedRewardWeightedStage(StageModule):
    default_metric = "eval/reward"
    stage_name = "reward_weighted_mlm"
    data_parallel = "none"  # several backward passes a step (StageModule.data_parallel)

    def __init__(self, model: MaskedLM, datamodule: PromptDataModule, reward: RewardSpec, weighting: WeightingSpec,
                 likelihood: Literal["elbo", "one_step"] = "elbo", generation: MaskPredictSpec | None = None,
                 optim: OptimizerSpec = OptimizerSpec(lr=5e-4),
                 scheduler: SchedulerSpec = SchedulerSpec(name="constant", warmup_steps=0),
                 max_grad_norm: float | None = 1.0, rollouts: int = 40, updates_per_rollout: int = 2,
                 eval: EvalSpec | None = None, samples_every: int = 10, seed: int = 0,
                 forward_batch_size: int | None = None, numerics: NumericsSpec | None = None):
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        self.automatic_optimization = False
        one_of("likelihood", likelihood, LIKELIHOODS)
        positive("rollouts", rollouts)
        positive("updates_per_rollout", updates_per_rollout)
        non_negative("samples_every", samples_every)
        if forward_batch_size is not None:
            positive("forward_batch_size", forward_batch_size)
        require(model.is_adapter, "model", "this stage trains a LoRA adapter on the frozen start model (its "
                                           "reference for eval/drift); model.lora=null is not supported by it")
        self.model, self.datamodule, self.weighting, self.likelihood = model, datamodule, weighting, likelihood
        self.generation = generation or MaskPredictSpec()
        self.eval_spec = eval or EvalSpec()
        self.rollouts, self.updates_per_rollout, self.samples_every = rollouts, updates_per_rollout, samples_every
        self.forward_batch_size = forward_batch_size
        self.slot = self.generation.response_length or model.slot
        self.scorer = Scorer(reward, reward_model_of(reward))
        # the stage's own state, all of it checkpointed
        self.rollout_count = 0
        self.sampler = torch.Generator().manual_seed(seed)
        self.initial_eval: dict[str, float] = {}
        self.eval_results: dict[str, float] = {}
        self._eval_rows: list[dict[str, Any]] = []

    def train(self, mode: bool = True) -> MaskedRewardWeightedStage:
        super().train(mode)
        self.model.eval()  # dropout off while sampling and updating
        return self

    # -- step 1: sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], prompts: list[str], raw_prompts: list, group_size: int,
               generator: torch.Generator, reference: bool = False) -> Infills:
        tok = self.model.tokenizer
        start = masked_prompts(tok, prompt_ids, self.slot).repeat(group_size)
        if reference:
            with self.model.module.disable_adapter():
                ids = mask_predict(self.model.module, start, start.slot_mask, self.generation, tok.mask_token_id,
                                   banned_ids(tok), generator)
        else:
            ids = mask_predict(self.model.module, start, start.slot_mask, self.generation, tok.mask_token_id,
                               banned_ids(tok), generator)
        batch = InfillBatch(ids, start.attention_mask, start.slot_mask)
        slots = batch.slots()
        texts, ended = decode_slots(tok, slots)
        return Infills(batch, slots, texts, ended, response_lengths(tok, slots),
                       repeat_each(prompts, group_size), repeat_each(raw_prompts, group_size))

    # -- step 4: the likelihood estimate and the loss ------------------------------------------------
    def log_likelihood_terms(self, infills: Infills, rows: slice) -> Tensor:
        """[n, L] the terms of the estimate of log pi(y | x) of `rows` (rl/infill_likelihood.py), with gradient."""
        batch, targets = infills.batch, infills.slots[rows]
        slot_mask = batch.slot_mask[rows]
        if self.likelihood == "one_step":
            masked = torch.ones_like(targets, dtype=torch.bool)
        else:
            masked, ratio = draw_masking(targets.shape[0], targets.shape[1], self.sampler)
        inputs = batch.input_ids[rows].clone()
        inputs[slot_mask] = torch.where(masked, self.model.tokenizer.mask_token_id, targets).reshape(-1)
        logits = self.model(inputs, batch.attention_mask[rows])[slot_mask].view(*targets.shape, -1)
        if self.likelihood == "one_step":
            return one_step_terms(logits, targets)
        return elbo_terms(logits, targets, masked, ratio)

    def update(self, infills: Infills, weights: Tensor) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
        stats: dict[str, list[float]] = {}
        steps = 0
        rows = infills.batch.rows
        slot_positions = torch.ones(rows, self.slot)
        for _ in range(self.updates_per_rollout):
            optimizer.zero_grad()
            terms = torch.cat([self.log_likelihood_terms(infills, r) for r in chunks(rows, self.forward_batch_size)])
            # detail: every row counts L slot positions, so Z is a count of responses times L (see docstring)
            loss = weighted_sequence_nll(terms, slot_positions, weights, self.weighting.normalizer)
            self.manual_backward(loss)
            merged = {"policy/loss": loss.item(),
                      "policy/loglik_estimate": terms.detach().sum(1).mean().item()}
            steps += self.minibatch_step(optimizer, scheduler, params, loss.detach()[None], merged, stats)
        out = {key: sum(v) / len(v) for key, v in stats.items()}
        out["policy/optimizer_steps"] = float(steps)
        out["numerics/skipped_batches"] = float(self.guard.skipped_total)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        k = self.weighting.group_size
        raw = [self.datamodule.train_examples[int(i)].prompt for i in batch["index"]]
        # step 1. sample k infills per prompt
        infills = self.sample(batch["prompt_ids"], batch["prompt_text"], raw, k, self.sampler)
        # step 2. score, shaped in the start model's units
        scores, components = self.scorer.score(infills)
        self.scorer.observe(scores)
        shaped = self.scorer.shape(scores, infills.ended)
        # step 3. the weights of the k infills of each prompt
        weights = self.weighting.weights(shaped)
        if not self.guard.check(self.global_step, scores=scores, rewards=shaped, advantages=weights):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return
        sampled = time.perf_counter()
        # step 4. the weighted NLL of the estimate
        stats = self.update(infills, weights)
        updated = time.perf_counter()
        # step 5. bookkeeping
        self.rollout_count += 1
        grouped = shaped.view(-1, k)
        metrics = {"objective/scores": scores.mean().item(), "reward/score_shaped": shaped.mean().item(),
                   "reward/best_of_k_shaped": grouped.max(1).values.mean().item(),
                   "reward/length_mean": infills.lengths.mean().item(),
                   "reward/frac_ended": infills.ended.float().mean().item(),
                   "weights/nonzero_frac": (weights != 0).float().mean().item(),
                   "weights/abs_mean": weights.abs().mean().item(),
                   "time/rollout_s": sampled - started, "time/update_s": updated - sampled,
                   "progress/rollouts": float(self.rollout_count), **stats}
        metrics.update({f"reward/components/{name}": v.mean().item() for name, v in components.items()})
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "objective/scores")
        if self.samples_every and self.rollout_count % self.samples_every == 0:
            self._log_table("rollout_samples", infills.prompts, infills.texts, scores.tolist())
        if self.rollout_count >= self.rollouts:
            self.trainer.should_stop = True

    # -- the start model's statistics and evaluation -----------------------------------------------
    def on_train_start(self) -> None:
        if self.rollout_count == 0 and not self.initial_eval:
            log_data_summary(self.logger, self.datamodule.summary)
            self.calibrate()
            if self.eval_spec.at_start:
                self.initial_eval = self.evaluate()
                if self.logger is not None:
                    self.logger.log_metrics(dict(self.initial_eval), step=0)

    @torch.no_grad()
    def calibrate(self) -> None:
        """The start model's scores on the first training prompts set the scorer's normalisation."""
        dm = self.datamodule
        features = dm.train_set.items[: max(1, self.scorer.spec.normalize.init_rollouts) * dm.batch_size]
        generator = torch.Generator().manual_seed(self.eval_spec.seed + 1)
        measured = []
        for rows in chunks(len(features), dm.batch_size):
            chunk = features[rows]
            infills = self.sample([f.prompt_ids for f in chunk], [f.prompt_text for f in chunk],
                                  [dm.train_examples[f.index].prompt for f in chunk], self.weighting.group_size,
                                  generator)
            measured.append(self.scorer.measure(infills))
        scores_all = self.scorer.calibrate_initial(measured)  # an ensemble's members' units, then the score's
        log.info("start model over %d infills: score %.3f +- %.3f", len(scores_all), scores_all.mean().item(),
                 scores_all.std().item())

    @torch.no_grad()
    def drift(self, infills: Infills) -> Tensor:
        """[N] sum over the slot of KL(p_theta || p_start) of the all-mask step's distributions."""
        tok = self.model.tokenizer
        batch = infills.batch
        ids = batch.input_ids.masked_fill(batch.slot_mask, tok.mask_token_id)
        logp = torch.log_softmax(self.model(ids, batch.attention_mask)[batch.slot_mask].float(), -1)
        ref = torch.log_softmax(self.model.reference_logits(ids, batch.attention_mask)[batch.slot_mask].float(), -1)
        kl = (logp.exp() * (logp - ref)).sum(-1)
        return kl.view(batch.rows, -1).sum(1)

    @torch.no_grad()
    def _evaluate_batch(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        raw = [self.datamodule.val_examples[int(i)].prompt for i in batch["index"]]
        generator = torch.Generator().manual_seed(self.eval_spec.seed + batch_idx)
        infills = self.sample(batch["prompt_ids"], batch["prompt_text"], raw, 1, generator)
        row = {"prompts": infills.prompts, "texts": infills.texts, "scores": self.scorer.score(infills)[0],
               "drift": self.drift(infills), "lengths": infills.lengths, "ended": infills.ended.float()}
        evaluator = getattr(self.datamodule, "evaluator", None)
        if evaluator is not None:
            row["gold"] = torch.tensor(evaluator(infills.prompts, infills.texts), dtype=torch.float32)
        return row

    def evaluate(self) -> dict[str, float]:
        return self._summarise([self._evaluate_batch(b, i) for i, b in enumerate(self.datamodule.val_dataloader())])

    def _summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        first, n = rows[0], self.eval_spec.num_logged
        self._log_table("eval_samples", first["prompts"][:n], first["texts"][:n], first["scores"][:n].tolist(),
                        first["gold"][:n].tolist() if "gold" in first else None)
        cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], Tensor)}
        metrics = {"eval/reward": cat["scores"].mean().item(), "eval/drift": cat["drift"].mean().item(),
                   "eval/length_mean": cat["lengths"].mean().item(), "eval/frac_ended": cat["ended"].mean().item()}
        if "gold" in cat:
            metrics["eval/gold_score"] = cat["gold"].mean().item()
            metrics["eval/gold_score_std"] = cat["gold"].std().item() if len(cat["gold"]) > 1 else 0.0
        return metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_rows.append(self._evaluate_batch(batch, batch_idx))

    def on_validation_epoch_end(self) -> None:
        rows, self._eval_rows = self._eval_rows, []
        if self.trainer.sanity_checking or not rows:
            return
        self.eval_results = self._summarise(rows)
        for name, value in self.eval_results.items():
            self.log(name, value, prog_bar=name == "eval/gold_score")
        self.last_validated_step = self.global_step

    def _log_table(self, tag: str, prompts: list[str], texts: list[str], scores: list[float],
                   gold: list[float] | None = None) -> None:
        log_sample_table(self.logger, tag, self.rollout_count, self.eval_spec.num_logged, prompts, texts, scores,
                         gold, response="infill")

    # -- optimisation and checkpoints ----------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_and_schedule(self.optim.build(self.named_trainable()),
                                           self.rollouts * self.updates_per_rollout)

    def stage_state(self) -> dict[str, Any]:
        return {**self.scorer.state_dict(), "rollout_count": self.rollout_count, "sampler": self.sampler.get_state(),
                "initial_eval": dict(self.initial_eval), "eval": dict(self.eval_results)}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.scorer.load_state_dict(state)
        self.rollout_count = int(state["rollout_count"])
        self.sampler.set_state(state["sampler"])
        self.initial_eval, self.eval_results = dict(state["initial_eval"]), dict(state["eval"])

    # -- what the launcher reads ---------------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        metrics = dict(self.eval_results)
        metrics.update({f"{k}_initial": v for k, v in self.initial_eval.items()})
        metrics["progress/rollouts"] = float(self.rollout_count)
        return metrics

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        return export_masked_lm(self.model, out_dir, stage=self.stage_name, config=config, metrics=metrics)


def reward_model_of(reward: RewardSpec):
    """The scorer's reward model: a reward-model export read as text (it may sit on any base and
    tokenizer, e.g. the causal `tiny_zh`'s), or None for Python components alone."""
    if reward.path is None:
        return None
    from lightrlhf.models.reward import RewardModel, reward_manifest

    reward_manifest(reward.path, key="reward.path")
    model = RewardModel.from_pretrained(reward.path)
    if model.ensemble_size > 1 and reward.ensemble.standardises:  # every member's: min or uncertainty combines them
        return lambda samples: model.member_scores(samples.raw_prompts, samples.texts)
    return lambda samples: model.score(samples.raw_prompts, samples.texts)
