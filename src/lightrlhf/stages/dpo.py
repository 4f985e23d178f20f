"""Direct preference optimisation: the policy learns from preference pairs, no reward model, no sampling.

One `training_step` on a batch of B pairs, in the order of the algorithm (the math is rl/dpo.py):

    step 1. policy     log pi(y|x) summed over each response's tokens (and its EOS): the prompt once,
                       chosen and rejected against its KV cache (models/shared_prompt.py), or, when
                       a pair's prompts differ, chosen and rejected as one forward of 2B rows
    step 2. reference  the same under the reference: the same base with the policy adapter off (no
                       second model), under no_grad -- or read from a cache computed once before
                       training (`reference.precompute=true`)
    step 3. loss       sigmoid (DPO), sigmoid with label smoothing (cDPO), ipo or hinge (SLiC), and
                       the implicit rewards beta * (log pi - log ref)
    step 4. log        train/loss, train/rewards/{chosen,rejected,margins,accuracies}, train/logps/*

Choices, and why:
- The policy is a fresh LoRA adapter on the base (the SFT export of `policy.init` merged in), as in
  PPO: at step 0 it *is* the reference, so the log-ratios are exactly 0, the sigmoid loss is exactly
  log 2 and the KL is 0. Dropout is off in every pass (as TRL's `disable_dropout`): with dropout the
  policy would not equal the reference at step 0, and two passes over one sequence would disagree.
- Log-probs are taken over the response tokens only, with position ids counted from each row's first
  real token, so they do not depend on how a batch is padded (tested for left, right and no padding).
- IPO is fed log-probs *averaged* over response tokens (see rl/dpo.py); sigmoid and hinge sums.
- The data's per-pair `margin` (used by the reward model) is not used: DPO has no reward scale for it.
- The reference cache holds the summed reference log-prob of every pair of each split, keyed by the
  example's index in its split. It is not checkpointed: a resumed run recomputes it (one forward pass
  over the data, deterministic), which keeps checkpoints small.

Validation (every `trainer.val_check_interval` steps): over the held-out pairs, the loss and the metrics
above (`val/rewards/accuracies` is the held-out preference accuracy: the implicit reward ranks the
chosen answer first); then held-out sampling on the validation prompts with rollouts/evaluation.py,
exactly as PPO reports it: KL to the reference, length, EOS fraction, and with an evaluator (the demo)
the hidden gold score and the win rate against the reference (SFT) policy's samples for the same
prompts and seed (`eval/gold_score`, `eval/win_rate_vs_sft`; `*_initial` before the first step).
With `eval_prompts` (a prompts data config) the sampling uses that config's held-out prompts instead,
in its order and batches: PPO, GRPO and RLOO evaluate on the same prompts with the same seeds, so the
methods are measured on identical draws of the SFT policy (experiment=method_ranking).

Export: the policy adapter as a standalone causal-LM export, like SFT's and PPO's (PPO, best-of-n
and `policy.init` load it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightrlhf.data.modules import PreferenceDataModule, PromptDataModule, collate_pairs
from lightrlhf.data.source import DataSource
from lightrlhf.data.tokenize import TruncationReport, encode_prompt, fit_prompt, prompt_text
from lightrlhf.models.actor_critic import POLICY, ActorCritic
from lightrlhf.models.export import export_policy_adapter
from lightrlhf.models.shared_prompt import checkpointing, response_logprobs, split_prompts
from lightrlhf.rl.dpo import DPOLossType, check_dpo_settings, dpo_loss, dpo_metrics
from lightrlhf.rl.logprobs import sequence_logprobs
from lightrlhf.rollouts.evaluation import PolicyEvaluation
from lightrlhf.rollouts.rollout import chunks
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.stages.base import StageModule
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.training.reporting import log_data_summary, markdown_table, writes_step_metrics

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class ReferenceSpec:
    """Where the reference log-probs come from: a forward with the adapter off at every step, or
    (`precompute`) one pass over the data before training, cached (one forward per step saved)."""

    precompute: bool = False


@dataclass
class PairLogps:
    """Summed log-probs of each pair's responses [B], and their lengths in tokens [B]."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def response_mask(attention_mask: Tensor, response_length: Tensor) -> Tensor:
    """1 on the last `response_length` real tokens of each row, wherever the padding sits."""
    rank = attention_mask.long().cumsum(1)  # 1-based position among the row's real tokens
    real = attention_mask.long().sum(1, keepdim=True)
    return (attention_mask.bool() & (rank > real - response_length[:, None])).long()


class DPOStage(StageModule):
    default_metric = "val/loss"
    stage_name = "dpo"

    def __init__(self, model: ActorCritic, datamodule: PreferenceDataModule,
                 optim: OptimizerSpec = OptimizerSpec(lr=5e-4),
                 scheduler: SchedulerSpec = SchedulerSpec(name="cosine", warmup_steps=10),
                 loss_type: DPOLossType = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 reference: ReferenceSpec | None = None, max_grad_norm: float | None = 1.0,
                 generation: GenerationSpec | None = None, eval: EvalSpec | None = None,
                 eval_prompts: DataSource | None = None, numerics: NumericsSpec | None = None):
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        check_dpo_settings(loss_type, beta, label_smoothing)
        self.model, self.datamodule = model, datamodule
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.reference = reference or ReferenceSpec()
        self.generation, self.eval_spec = generation or GenerationSpec(), eval or EvalSpec()
        # held-out sampling on another config's prompts, batched as the online stages batch them
        self.eval_prompts = None if eval_prompts is None else PromptDataModule(
            eval_prompts, model.tokenizer, batch_size=1, eval_batch_size=self.eval_spec.batch_size,
            max_eval_prompts=self.eval_spec.num_prompts)
        evaluator = eval_prompts.evaluator if eval_prompts is not None else getattr(datamodule, "evaluator", None)
        self.evaluation = PolicyEvaluation(model, None, self.generation, self.eval_spec, evaluator)
        self.reference_cache: dict[str, Tensor] = {}  # split -> [examples, 2] summed log-probs (NaN: none)
        self.initial_eval: dict[str, float] = {}
        self.eval_results: dict[str, float] = {}
        self.val_results: dict[str, float] = {}
        self._val_rows: list[dict[str, Tensor]] = []

    # -- log-probs -----------------------------------------------------------------------------
    def pair_logps(self, batch: dict[str, Tensor], reference: bool = False) -> PairLogps:
        """Chosen and rejected under the policy (or the reference): the prompt once and both responses
        against its cache, or one forward of 2B rows."""
        shared = None if checkpointing(self.model.module) else split_prompts(
            [(batch[f"{k}_ids"], batch[f"{k}_mask"], batch[f"{k}_length"]) for k in ("chosen", "rejected")],
            self.model.tokenizer.pad_token_id)
        if shared is not None:
            with (self.model.reference_context if reference else self.model.policy_context)():
                total, tokens = response_logprobs(self.model.module, shared)
            return PairLogps(total[0::2], total[1::2], tokens[0::2], tokens[1::2])
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        scored = response_mask(mask, torch.cat([batch["chosen_length"], batch["rejected_length"]]))
        # detail: the LM head runs only from the position before the first scored token on (the prompts'
        # logits are never read), which halves its work when prompt and response are equally long.
        last = ids.shape[1] - int(scored.any(0).int().argmax()) + 1
        logits = (self.model.reference_logits if reference else self.model.policy_logits)(ids, mask, last=last)
        total, tokens = sequence_logprobs(logits, ids[:, -last:], scored[:, -last:])
        chosen, rejected = total.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) summed reference log-probs [B]: cached, or a forward with the adapter off."""
        if not self.reference.precompute:
            ref = self.pair_logps(batch, reference=True)
            return ref.chosen, ref.rejected
        if split not in self.reference_cache:
            self.reference_cache[split] = self.precompute_reference(split)
        cached = self.reference_cache[split][batch["index"].cpu()].to(batch["chosen_ids"].device)
        if torch.isnan(cached).any():
            raise RuntimeError(f"reference cache of the {split} split has no entry for a batch example")
        return cached[:, 0], cached[:, 1]

    @torch.no_grad()
    def precompute_reference(self, split: str) -> Tensor:
        """[examples, 2] summed reference log-probs of (chosen, rejected) for every pair of a split."""
        dataset = self.datamodule.train_set if split == "train" else self.datamodule.val_set
        cache = torch.full((max((f.index for f in dataset.items), default=-1) + 1, 2), float("nan"))
        collate = collate_pairs(self.model.tokenizer.pad_token_id)
        size = self.datamodule.eval_batch_size
        for rows in chunks(len(dataset), size):
            batch = {k: v.to(self.device) for k, v in collate(dataset.items[rows]).items()}
            ref = self.pair_logps(batch, reference=True)
            cache[batch["index"].cpu()] = torch.stack([ref.chosen, ref.rejected], 1).cpu()
        return cache

    def loss_inputs(self, batch: dict[str, Tensor], split: str) -> tuple[PairLogps, Tensor, Tensor]:
        """(policy log-probs with grad, reference chosen, reference rejected) as the loss reads them."""
        policy = self.pair_logps(batch)  # step 1. policy
        ref_chosen, ref_rejected = self.reference_logps(batch, split)  # step 2. reference
        return policy, ref_chosen, ref_rejected

    def _loss(self, policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor):
        chosen, rejected = policy.chosen, policy.rejected
        if self.loss_type == "ipo":  # detail: IPO's margin target is per token (rl/dpo.py)
            chosen, rejected = chosen / policy.chosen_tokens, rejected / policy.rejected_tokens
            ref_chosen, ref_rejected = ref_chosen / policy.chosen_tokens, ref_rejected / policy.rejected_tokens
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                        self.label_smoothing), chosen, rejected

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        policy, ref_chosen, ref_rejected = self.loss_inputs(batch, "train")
        # step 3. loss and implicit rewards
        result, chosen, rejected = self._loss(policy, ref_chosen, ref_rejected)
        loss = result.loss
        if not self.guard.check(self.global_step, loss=loss.detach()):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return None  # Lightning skips backward and the optimizer step for this batch
        # step 4. log
        self.log("train/loss", loss, prog_bar=True)
        if not writes_step_metrics(self._trainer):
            return loss
        for name, value in dpo_metrics(result, chosen, rejected).items():
            self.log(f"train/{name}", value, prog_bar=name == "rewards/accuracies")
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        policy, ref_chosen, ref_rejected = self.loss_inputs(batch, "validation")
        self._val_rows.append({"chosen": policy.chosen, "rejected": policy.rejected,
                               "chosen_tokens": policy.chosen_tokens, "rejected_tokens": policy.rejected_tokens,
                               "ref_chosen": ref_chosen, "ref_rejected": ref_rejected})

    def on_validation_epoch_end(self) -> None:
        rows, self._val_rows = self._val_rows, []
        if self.trainer.sanity_checking:
            return
        results: dict[str, float] = {}
        if rows:
            cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            policy = PairLogps(cat["chosen"], cat["rejected"], cat["chosen_tokens"], cat["rejected_tokens"])
            result, chosen, rejected = self._loss(policy, cat["ref_chosen"], cat["ref_rejected"])
            results = {"val/loss": result.loss.item()}
            results.update({f"val/{k}": v.item() for k, v in dpo_metrics(result, chosen, rejected).items()})
        self.val_results = results
        self.eval_results = self.evaluate()
        for name, value in {**self.val_results, **self.eval_results}.items():
            self.log(name, value, prog_bar=name in ("val/rewards/accuracies", "eval/gold_score"))
        self.last_validated_step = self.global_step

    def on_fit_start(self) -> None:
        self.model.train()  # dropout stays off (ActorCritic.train): the policy equals the reference at step 0

    def on_train_start(self) -> None:
        if self.global_step == 0:
            log_data_summary(self.logger, self.datamodule.summary)
            if self.eval_spec.at_start and not self.initial_eval:
                self.initial_eval = self.evaluate()
                if self.logger is not None and self.initial_eval:
                    self.logger.log_metrics(dict(self.initial_eval), step=0)

    # -- held-out sampling ---------------------------------------------------------------------
    def evaluation_prompts(self) -> list[tuple[list[int], str, Any]]:
        """(ids, text, raw prompt) of the first `eval.num_prompts` distinct validation prompts."""
        dm, seen, out = self.datamodule, set(), []
        for example in dm.val_examples:
            text = prompt_text(self.model.tokenizer, example.prompt)
            if text in seen:
                continue
            seen.add(text)
            # the truncation was counted when the data module read the pairs: this report is dropped
            ids = fit_prompt(encode_prompt(self.model.tokenizer, example.prompt), dm.max_prompt_length,
                             TruncationReport())
            out.append((ids, text, example.prompt))
            if len(out) >= self.eval_spec.num_prompts:
                break
        return out

    def evaluation_batches(self) -> list[tuple[list[list[int]], list[str], list[Any]]]:
        """(ids, texts, raw prompts) per generation batch: `eval_prompts`' held-out prompts in their
        data loader's batches, else the distinct prompts of the held-out pairs in chunks."""
        if self.eval_prompts is not None:
            dm = self.eval_prompts
            dm.setup("fit")
            return [(batch["prompt_ids"], batch["prompt_text"], [dm.val_examples[int(i)].prompt for i in batch["index"]])
                    for batch in dm.val_dataloader()]
        prompts = self.evaluation_prompts()
        return [([p[0] for p in prompts[s]], [p[1] for p in prompts[s]], [p[2] for p in prompts[s]])
                for s in chunks(len(prompts), self.eval_spec.batch_size)]

    def evaluate(self) -> dict[str, float]:
        batches = self.evaluation_batches() if self.eval_spec.num_prompts else []
        if not batches:
            return {}
        rows = [self.evaluation.batch(ids, texts, raw, batch_idx) for batch_idx, (ids, texts, raw) in enumerate(batches)]
        self._log_samples(rows[0])
        return self.evaluation.summarise(rows)

    def _log_samples(self, row: dict[str, Any]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        n = self.eval_spec.num_logged
        gold = row["gold"][:n].tolist() if "gold" in row else None
        header = ["prompt", "completion"] + (["gold"] if gold is not None else [])
        table = [[p, t] + ([g] if gold is not None else [])
                 for p, t, g in zip(row["prompts"][:n], row["texts"][:n], gold or [None] * n)]
        experiment.add_text("eval_samples", markdown_table(header, table), self.global_step)

    # -- optimisation and checkpoints ----------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_and_schedule(self.optim.build(self.named_trainable()),
                                           int(self.trainer.estimated_stepping_batches))

    def stage_state(self) -> dict[str, Any]:
        return {"initial_eval": dict(self.initial_eval), "eval": dict(self.eval_results),
                "val": dict(self.val_results)}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.initial_eval, self.eval_results = dict(state.get("initial_eval", {})), dict(state.get("eval", {}))
        self.val_results = dict(state.get("val", {}))

    # -- what the launcher reads ---------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        metrics = {**self.val_results, **self.eval_results}
        metrics.update({f"{k}_initial": v for k, v in self.initial_eval.items()})
        return metrics

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        return export_policy_adapter(self.model, POLICY, out_dir, stage="dpo", config=config, metrics=metrics,
                                     merged=merged)

