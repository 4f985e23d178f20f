"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022), one rollout per batch.

One `training_step` is one PPO iteration on a batch of prompts, in the order of the algorithm:

    step 1. roll out    sample responses from the policy (KV cache, dropout off, no grad)
    step 2. score       policy and reference log-probs, values, the composite reward score
    step 3. rewards     r_t = -beta * KL_t, plus the shaped score at the last token
    step 4. advantages  GAE over response tokens, whitened over valid tokens only
    step 5. update      epochs x minibatches, exactly one optimizer step per minibatch
    step 6. bookkeeping adaptive beta, logs, reward-hacking tripwires

Lightning runs the loop (`automatic_optimization = False`): its `global_step` counts optimizer
steps, the rollout counter is logged separately, and the stage's own state -- KL coefficient,
reward normaliser, sampler RNG, rollout counter, the SFT baseline -- goes into every checkpoint.

Evaluation (Lightning's validation loop over held-out prompts, every `trainer.val_check_interval`
rollouts and at the start): mean reward-model score, KL to the reference, and with an evaluator
(the demo) the hidden gold score and the win rate against the initial (SFT) policy's samples
for the same prompts and seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from lightrlhf.data.modules import PromptDataModule
from lightrlhf.models.actor_critic import ActorCritic
from lightrlhf.models.generation import Generation, decode_responses, left_pad, sample
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl import (
    RunningMeanStd,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    token_logprobs,
)
from lightrlhf.training.checkpointing import check_trainable, keep_trainable
from lightrlhf.training.numerics import NonFiniteGuard, NumericsSpec, gradient_norm
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.training.alerts import AlertSpec
from lightrlhf.rl.kl_control import KLSpec
from lightrlhf.training.reporting import log_data_summary, markdown_table
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.validation import in_range, non_negative, one_of, positive, require

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """Everything one PPO iteration learns from; tensors are [B, R] over response tokens."""

    sequences: Tensor
    attention_mask: Tensor
    prompt_width: int
    responses: Tensor
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    entropy: Tensor
    kl: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor  # composite score, raw
    shaped: Tensor  # after normalisation, clipping and the EOS penalty
    components: dict[str, Tensor]
    ended_with_eos: Tensor
    prompts: list[str]
    texts: list[str]


@dataclass(frozen=True)
class PPOSpec:
    """The update: `epochs` passes over each rollout batch in `num_minibatches` minibatches, one
    optimizer step per minibatch (micro-batches of `micro_batch_size` accumulate inside one).

    clip_range: policy ratio clip epsilon (Schulman et al. 2017, eq. 7).
    value_clip_range: clip of the value update around the rollout's values.
    vf_coef: weight of the value loss; entropy_coef: entropy bonus (0 = off).
    gamma, lam: GAE discount and trace decay (Schulman et al. 2016); gamma = 1 for RLHF's single reward.
    max_approx_kl: stop the remaining epochs of a rollout once the minibatch approx-KL exceeds this.
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


class PPOStage(L.LightningModule):
    default_metric = "eval/reward"

    def __init__(self, model: ActorCritic, datamodule: PromptDataModule, reward: RewardSpec,
                 generation: GenerationSpec | None = None, kl: KLSpec | None = None, ppo: PPOSpec | None = None,
                 optim: OptimizerSpec | None = None, scheduler: SchedulerSpec | None = None,
                 max_grad_norm: float | None = 1.0, value_lr_scale: float = 1.0, rollouts: int = 200,
                 exploration_epsilon: float = 0.0, eval: EvalSpec | None = None, samples_every: int = 10,
                 alerts: AlertSpec | None = None, seed: int = 0, numerics: NumericsSpec | None = None):
        super().__init__()
        self.automatic_optimization = False
        if max_grad_norm is not None:
            positive("max_grad_norm", max_grad_norm)
        positive("value_lr_scale", value_lr_scale)
        positive("rollouts", rollouts)
        in_range("exploration_epsilon", exploration_epsilon, 0.0, 1.0)
        non_negative("samples_every", samples_every)
        self.model, self.datamodule, self.reward = model, datamodule, reward
        self.generation, self.kl_spec, self.ppo = generation or GenerationSpec(), kl or KLSpec(), ppo or PPOSpec()
        if datamodule is not None:
            check_minibatches(datamodule.batch_size, self.ppo)
        self.optim, self.scheduler = optim or OptimizerSpec(lr=1e-4), scheduler or SchedulerSpec(name="constant")
        self.max_grad_norm, self.value_lr_scale, self.rollouts = max_grad_norm, value_lr_scale, rollouts
        self.exploration_epsilon, self.samples_every = exploration_epsilon, samples_every
        self.eval_spec, self.alerts = eval or EvalSpec(), alerts or AlertSpec()
        self.strict_loading = False
        self.guard = NonFiniteGuard(numerics, "ppo")
        # the stage's own state, all of it checkpointed
        self.kl_controller = self.kl_spec.controller()
        self.normalizer = RunningMeanStd()
        self.rollout_count = 0
        self.sampler = torch.Generator().manual_seed(seed)
        self.baseline: dict[str, float] = {}  # the initial (SFT) policy's rollout statistics
        self.alerts_fired: dict[str, int] = {}
        self.initial_eval: dict[str, float] = {}
        self.eval_results: dict[str, float] = {}
        self.last_validated_step = -1
        self._reference_eval: dict[int, tuple[list[str], list[float] | None]] = {}
        self._eval_rows: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            from lightrlhf.errors import UserError

            raise UserError("config trainer: stage=ppo runs on one process (each rollout makes several backward "
                            "passes, which data-parallel wrappers do not allow); use trainer=default or trainer=gpu")

    def train(self, mode: bool = True) -> PPOStage:
        super().train(mode)
        self.model.eval()  # detail: dropout stays off in rollouts and updates (see ActorCritic.train)
        return self

    # -- step 1 and 2: roll out and score ------------------------------------------------------
    def _chunks(self, rows: int) -> list[slice]:
        size = self.ppo.forward_batch_size or rows
        return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]

    @torch.no_grad()
    def score_sequences(self, gen: Generation) -> dict[str, Tensor]:
        """Policy/reference log-probs, entropy and values over the response positions, by chunks."""
        seq, attn, width, temperature = gen.sequences, gen.attention_mask, gen.prompt_ids.shape[1], self._temperature
        out: dict[str, list[Tensor]] = {"logprobs": [], "ref_logprobs": [], "entropy": [], "values": []}
        for rows in self._chunks(seq.shape[0]):
            tokens = gen.response_ids[rows]
            logits = self.model.policy_logits(seq[rows], attn[rows])[:, width - 1:-1]
            out["logprobs"].append(token_logprobs(logits, tokens, temperature))
            out["entropy"].append(entropy_from_logits(logits, temperature))
            del logits
            ref = self.model.reference_logits(seq[rows], attn[rows])[:, width - 1:-1]
            out["ref_logprobs"].append(token_logprobs(ref, tokens, temperature))
            del ref
            out["values"].append(self.model.values(seq[rows], attn[rows])[:, width - 1:-1])
        return {k: torch.cat(v) for k, v in out.items()}

    @property
    def _temperature(self) -> float:
        return self.generation.temperature if self.generation.temperature > 0 else 1.0

    def _sample(self, prompt_ids: list[list[int]], generator: torch.Generator, reference: bool = False,
                explore: bool = False) -> Generation:
        tok = self.model.tokenizer
        ids, mask = left_pad(prompt_ids, tok.pad_token_id)
        spec = self.generation
        return sample(self.model.module, ids, mask, max_new_tokens=spec.max_new_tokens, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                      generator=generator, stop_at_eos=not spec.ignore_eos,
                      model_context=self.model.reference_context if reference else self.model.policy_context,
                      mix_model_context=self.model.reference_context if explore else None,
                      mix_epsilon=self.exploration_epsilon if explore else 0.0)

    @torch.no_grad()
    def composite_scores(self, gen: Generation, prompts: list[str], texts: list[str],
                         raw_prompts: list | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the reward model's score and every configured component (raw units)."""
        components: dict[str, Tensor] = {}
        total = torch.zeros(len(texts))
        if self.model.shares_reward_base:
            rm = torch.cat([self.model.reward_scores(gen.sequences[rows], gen.attention_mask[rows])
                            for rows in self._chunks(len(texts))])
            components["reward_model"] = rm.float()
        elif self.model.separate_reward is not None:
            components["reward_model"] = self.model.separate_reward.score(raw_prompts or prompts, texts).float()
        if "reward_model" in components:
            total = total + self.reward.weight * components["reward_model"]
        for name, component in self.reward.components.items():
            values = torch.as_tensor(component.fn(prompts, texts), dtype=torch.float32)
            components[name] = values
            total = total + component.weight * values
        return total, components

    def shape_scores(self, scores: Tensor, ended_with_eos: Tensor) -> Tensor:
        spec = self.reward
        shaped = self.normalizer.normalize(scores) if spec.normalize.enabled else scores.clone()
        shaped = shaped - spec.missing_eos_penalty * (~ended_with_eos).float()
        if spec.clip is not None:
            shaped = shaped.clamp(-spec.clip, spec.clip)
        return shaped

    def rollout(self, prompt_ids: list[list[int]], prompts: list[str], raw_prompts: list | None = None) -> Rollout:
        # step 1. roll out: sample from the policy (exploration may mix in reference tokens)
        gen = self._sample(prompt_ids, self.sampler, explore=self.exploration_epsilon > 0)
        texts = decode_responses(self.model.tokenizer, gen)
        # step 2. score: log-probs under policy and reference, values, the composite score
        scored = self.score_sequences(gen)
        scores, components = self.composite_scores(gen, prompts, texts, raw_prompts)
        if self.reward.normalize.enabled and self.reward.normalize.update:
            self.normalizer.update(scores)
        shaped = self.shape_scores(scores, gen.ended_with_eos)
        mask = gen.response_mask.float()
        # step 3. per-token rewards: -beta * KL_t everywhere, the shaped score at the last token
        kl = kl_penalty(scored["logprobs"], scored["ref_logprobs"], self.kl_spec.estimator) * mask
        rewards = per_token_rewards(shaped, kl, mask, self.kl_controller.value)
        # step 4. advantages: GAE, whitened over valid tokens only
        advantages, returns = gae(rewards, scored["values"], mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return Rollout(gen.sequences, gen.attention_mask, gen.prompt_ids.shape[1], gen.response_ids, mask,
                       scored["logprobs"], scored["ref_logprobs"], scored["values"], scored["entropy"], kl, rewards,
                       advantages, returns, scores, shaped, components, gen.ended_with_eos, prompts, texts)

    # -- step 5: the update --------------------------------------------------------------------
    def update(self, roll: Rollout) -> dict[str, float]:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        rows = roll.sequences.shape[0]
        minibatch = rows // self.ppo.num_minibatches
        micro = self.ppo.micro_batch_size or minibatch
        stats: dict[str, list[float]] = {}
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        steps = 0
        for _epoch in range(self.ppo.epochs):
            order = torch.randperm(rows, generator=self.sampler)
            stop = False
            for start in range(0, rows, minibatch):
                chosen = order[start:start + minibatch]
                optimizer.zero_grad()
                approx, losses = [], []
                for part in range(0, len(chosen), micro):
                    idx = chosen[part:part + micro]
                    result = self._loss(roll, idx, weight=len(idx) / len(chosen))
                    approx.append(result["policy/approxkl"])
                    losses.append([result["policy/loss"], result["val/loss"]])
                    for k, v in result.items():
                        stats.setdefault(k, []).append(v)
                grad_norm = gradient_norm(params)
                if not self.guard.check(self.global_step, loss=torch.tensor(losses), gradient_norm=grad_norm):
                    optimizer.zero_grad()  # skip this minibatch's step; the weights stay finite
                    continue
                stats.setdefault("policy/grad_norm", []).append(grad_norm.item())
                if self.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()  # exactly one optimizer step per minibatch
                if scheduler is not None:
                    scheduler.step()
                steps += 1
                if self.ppo.max_approx_kl is not None and sum(approx) / len(approx) > self.ppo.max_approx_kl:
                    stop = True  # detail: early stop -- the policy moved too far from the rollout policy
                    break
            if stop:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/optimizer_steps"] = float(steps)
        out["numerics/skipped_batches"] = float(self.guard.skipped_total)
        return out

    def _loss(self, roll: Rollout, idx: Tensor, weight: float) -> dict[str, float]:
        width, temperature, aggregation = roll.prompt_width, self._temperature, self.ppo.loss_aggregation
        seq, attn, mask = roll.sequences[idx], roll.attention_mask[idx], roll.mask[idx]
        logits = self.model.policy_logits(seq, attn)[:, width - 1:-1]
        logprobs = token_logprobs(logits, roll.responses[idx], temperature)
        policy = ppo_policy_loss(logprobs, roll.logprobs[idx], roll.advantages[idx], mask, self.ppo.clip_range,
                                 aggregation)
        entropy = masked_mean(entropy_from_logits(logits, temperature), mask)
        # detail: the policy loss is backpropagated before the value pass switches the active adapter,
        # so gradient-checkpoint recomputation runs each role with its own adapter.
        self.manual_backward((policy.loss - self.ppo.entropy_coef * entropy) * weight)
        values = self.model.values(seq, attn)[:, width - 1:-1]
        value = clipped_value_loss(values, roll.values[idx], roll.returns[idx], mask, self.ppo.value_clip_range,
                                   aggregation)
        self.manual_backward(self.ppo.vf_coef * value.loss * weight)
        return {"policy/loss": policy.loss.item(), "policy/clipfrac": policy.clipfrac.item(),
                "policy/approxkl": policy.approxkl.item(), "policy/ratio_mean": policy.ratio_mean.item(),
                "policy/entropy": entropy.item(), "val/loss": value.loss.item(), "val/clipfrac": value.clipfrac.item()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        roll = self.rollout(batch["prompt_ids"], batch["prompt_text"], self._raw_prompts(batch, train=True))
        if not self.guard.check(self.global_step, scores=roll.scores, rewards=roll.rewards,
                                advantages=roll.advantages, values=roll.values):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return  # no update from a poisoned rollout
        rolled = time.perf_counter()
        stats = self.update(roll)
        updated = time.perf_counter()
        # step 6. bookkeeping: adaptive beta, logs, tripwires
        kl_per_response = roll.kl.sum(1)
        self.kl_controller.update(kl_per_response.mean().item(), n_steps=roll.sequences.shape[0])
        self.rollout_count += 1
        metrics = self.rollout_metrics(roll, stats)
        metrics.update({"time/rollout_s": rolled - started, "time/update_s": updated - rolled,
                        "time/episodes_per_s": roll.sequences.shape[0] / (updated - started),
                        "progress/rollouts": float(self.rollout_count), "progress/episodes": float(
                            self.rollout_count * roll.sequences.shape[0])})
        metrics.update(self.check_alerts(metrics))
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("objective/scores", "objective/kl"))
        if self.samples_every and self.rollout_count % self.samples_every == 0:
            self._log_table("rollout_samples", roll.prompts, roll.texts, roll.scores.tolist())
        if self.rollout_count >= self.rollouts:
            self.trainer.should_stop = True

    def rollout_metrics(self, roll: Rollout, stats: dict[str, float]) -> dict[str, float]:
        mask = roll.mask
        kl_sum = roll.kl.sum(1)
        non_score = -self.kl_controller.value * kl_sum
        metrics = {
            "objective/kl": kl_sum.mean().item(),
            "objective/kl_coef": float(self.kl_controller.value),
            "objective/entropy": masked_mean(roll.entropy, mask).item(),
            "objective/scores": roll.scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (roll.shaped + non_score).mean().item(),
            "reward/score_shaped": roll.shaped.mean().item(),
            "reward/length_mean": mask.sum(1).mean().item(),
            "reward/frac_ended_with_eos": roll.ended_with_eos.float().mean().item(),
            "val/explained_variance": explained_variance(roll.values, roll.returns, mask).item(),
            "val/value_mean": masked_mean(roll.values, mask).item(),
            "val/returns_mean": masked_mean(roll.returns, mask).item(),
        }
        metrics.update({f"reward/components/{k}": v.mean().item() for k, v in roll.components.items()})
        metrics.update(stats)
        return metrics

    # -- tripwires ------------------------------------------------------------------------------
    def check_alerts(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.baseline:
            return {}
        spec, base = self.alerts, self.baseline
        length, score = metrics["reward/length_mean"], metrics["objective/scores"]
        fired = {
            "length_drift": abs(length - base["length_mean"]) > spec.length_drift * base["length_mean"]
                            and score > base["score_mean"],
            "eos_collapse": metrics["reward/frac_ended_with_eos"] < spec.eos_collapse * base["frac_ended_with_eos"],
            "kl_exceeded": metrics["objective/kl"] > spec.kl_multiple * self.kl_spec.target,
        }
        messages = {
            "length_drift": f"mean response length {length:.1f} vs {base['length_mean']:.1f} for the SFT policy "
                            f"while the score rose ({score:.3f} vs {base['score_mean']:.3f}): length hacking?",
            "eos_collapse": f"only {metrics['reward/frac_ended_with_eos']:.0%} of responses end with EOS "
                            f"(SFT: {base['frac_ended_with_eos']:.0%})",
            "kl_exceeded": f"KL to the reference {metrics['objective/kl']:.2f} exceeds {spec.kl_multiple} x "
                           f"kl.target ({self.kl_spec.target})",
        }
        for name, on in fired.items():
            if on:
                if name not in self.alerts_fired:
                    log.warning("alert %s at rollout %d: %s", name, self.rollout_count, messages[name])
                self.alerts_fired[name] = self.alerts_fired.get(name, 0) + 1
                if spec.stop:
                    log.warning("alerts.stop=true: stopping the run")
                    self.trainer.should_stop = True
        return {f"alerts/{k}": float(v) for k, v in fired.items()}

    # -- the initial (SFT) policy: normaliser statistics and tripwire baseline ----------------
    def on_train_start(self) -> None:
        if self.rollout_count == 0 and not self.baseline:
            log_data_summary(self.logger, self.datamodule.summary)
            self.measure_baseline()
            if self.eval_spec.at_start:
                self.initial_eval = self.evaluate()
                if self.logger is not None:
                    self.logger.log_metrics({f"{k}": v for k, v in self.initial_eval.items()}, step=0)

    @torch.no_grad()
    def measure_baseline(self) -> None:
        """Roll out the initial policy (= SFT, the adapter starts at zero) on the first training prompts."""
        batches = max(1, self.reward.normalize.init_rollouts)
        features = self.datamodule.train_set.items[: batches * self.datamodule.batch_size]
        generator = torch.Generator().manual_seed(self.eval_spec.seed + 1)
        scores, lengths, eos = [], [], []
        for start in range(0, len(features), self.datamodule.batch_size):
            chunk = features[start:start + self.datamodule.batch_size]
            gen = self._sample([f.prompt_ids for f in chunk], generator)
            texts = decode_responses(self.model.tokenizer, gen)
            raw = [self.datamodule.train_examples[f.index].prompt for f in chunk]
            total, _ = self.composite_scores(gen, [f.prompt_text for f in chunk], texts, raw)
            scores.append(total)
            lengths.append(gen.response_mask.sum(1).float())
            eos.append(gen.ended_with_eos.float())
        scores_all = torch.cat(scores)
        if self.reward.normalize.enabled:
            self.normalizer.update(scores_all)
        self.baseline = {"score_mean": scores_all.mean().item(), "score_std": scores_all.std().item(),
                         "length_mean": torch.cat(lengths).mean().item(),
                         "frac_ended_with_eos": torch.cat(eos).mean().item()}
        log.info("initial policy over %d rollouts: score %.3f +- %.3f, length %.1f, %.0f%% end with EOS",
                 len(scores_all), self.baseline["score_mean"], self.baseline["score_std"],
                 self.baseline["length_mean"], 100 * self.baseline["frac_ended_with_eos"])

    # -- evaluation ----------------------------------------------------------------------------
    def _raw_prompts(self, batch: dict[str, Any], train: bool) -> list:
        examples = self.datamodule.train_examples if train else self.datamodule.val_examples
        return [examples[int(i)].prompt for i in batch["index"]]

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        seed = self.eval_spec.seed + batch_idx
        gen = self._sample(batch["prompt_ids"], torch.Generator().manual_seed(seed))
        texts = decode_responses(self.model.tokenizer, gen)
        prompts = batch["prompt_text"]
        scored = self.score_sequences(gen)
        kl = (kl_penalty(scored["logprobs"], scored["ref_logprobs"], "k1") * gen.response_mask).sum(1)
        scores, _ = self.composite_scores(gen, prompts, texts, self._raw_prompts(batch, train=False))
        row = {"prompts": prompts, "texts": texts, "scores": scores, "kl": kl,
               "lengths": gen.response_mask.sum(1).float(), "eos": gen.ended_with_eos.float()}
        evaluator = self.datamodule.evaluator
        if evaluator is not None:
            row["gold"] = torch.tensor(evaluator(prompts, texts))
            if batch_idx not in self._reference_eval:  # the SFT policy's samples: same prompts, same seed
                ref = self._sample(batch["prompt_ids"], torch.Generator().manual_seed(seed), reference=True)
                ref_texts = decode_responses(self.model.tokenizer, ref)
                self._reference_eval[batch_idx] = (ref_texts, evaluator(prompts, ref_texts))
            row["gold_reference"] = torch.tensor(self._reference_eval[batch_idx][1])
        return row

    def evaluate(self) -> dict[str, float]:
        rows = [self.evaluate_batch(batch, i) for i, batch in enumerate(self.datamodule.val_dataloader())]
        return self._summarise(rows)

    def _summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], Tensor)}
        metrics = {"eval/reward": cat["scores"].mean().item(), "eval/kl": cat["kl"].mean().item(),
                   "eval/length_mean": cat["lengths"].mean().item(), "eval/frac_ended_with_eos": cat["eos"].mean().item()}
        if "gold" in cat:
            name = getattr(self.datamodule.evaluator, "name", "gold_score")
            metrics[f"eval/{name}"] = cat["gold"].mean().item()
            metrics[f"eval/{name}_std"] = cat["gold"].std().item() if len(cat["gold"]) > 1 else 0.0
            wins = (cat["gold"] > cat["gold_reference"]).float() + 0.5 * (cat["gold"] == cat["gold_reference"]).float()
            metrics["eval/win_rate_vs_sft"] = wins.mean().item()
        first = rows[0]
        n = self.eval_spec.num_logged
        self._log_table("eval_samples", first["prompts"][:n], first["texts"][:n], first["scores"][:n].tolist(),
                        first["gold"][:n].tolist() if "gold" in first else None)
        return metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_rows.append(self.evaluate_batch(batch, batch_idx))

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
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        n = self.eval_spec.num_logged
        header = ["prompt", "completion", "score"] + (["gold"] if gold is not None else [])
        rows = [[p, t, s] + ([g] if gold is not None else [])
                for p, t, s, g in zip(prompts[:n], texts[:n], scores[:n], (gold or [None] * n)[:n])]
        experiment.add_text(tag, markdown_table(header, rows), self.rollout_count)

    # -- optimisation --------------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        return [f"model.{n}" for n in self.model.trainable_parameter_names()]

    def configure_optimizers(self) -> dict[str, Any]:
        table = dict(self.named_parameters())
        policy = set(f"model.{n}" for n in self.model.policy_parameter_names())
        names = self.trainable_parameter_names()
        policy_params = [(n, table[n]) for n in names if n in policy]
        value_params = [(n, table[n]) for n in names if n not in policy]
        optimizer = self.optim.adamw(self.optim.build(policy_params) + self.optim.build(value_params, self.value_lr_scale))
        steps = self.rollouts * self.ppo.epochs * self.ppo.num_minibatches
        scheduler = self.scheduler.build(optimizer, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints and export ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable(checkpoint, self.trainable_parameter_names())
        checkpoint["lightrlhf"] = {
            "kl_controller": self.kl_controller.state_dict(), "normalizer": self.normalizer.state_dict(),
            "rollout_count": self.rollout_count, "sampler": self.sampler.get_state(),
            "baseline": dict(self.baseline), "alerts_fired": dict(self.alerts_fired),
            "initial_eval": dict(self.initial_eval), "eval": dict(self.eval_results),
            "numerics": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable(checkpoint, self.trainable_parameter_names())
        state = checkpoint["lightrlhf"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.normalizer.load_state_dict(state["normalizer"])
        self.rollout_count = int(state["rollout_count"])
        self.sampler.set_state(state["sampler"])
        self.baseline, self.alerts_fired = dict(state["baseline"]), dict(state["alerts_fired"])
        self.initial_eval, self.eval_results = dict(state["initial_eval"]), dict(state["eval"])
        self.guard.load_state_dict(state["numerics"])

    def final_metrics(self) -> dict[str, float]:
        metrics = dict(self.eval_results)
        metrics.update({f"{k}_initial": v for k, v in self.initial_eval.items()})
        metrics.update({f"alerts/{k}_count": float(v) for k, v in self.alerts_fired.items()})
        metrics["progress/rollouts"] = float(self.rollout_count)
        return metrics

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        from lightrlhf.models.actor_critic import POLICY
        from lightrlhf.models.export import export_policy_adapter

        return export_policy_adapter(self.model, POLICY, out_dir, stage="ppo", config=config, metrics=metrics,
                                     merged=merged)
