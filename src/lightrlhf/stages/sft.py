"""Supervised fine-tuning: next-token cross-entropy on demonstrations, LoRA or full weights.

Loss (per micro-batch, a mean over the tokens that count):

    L = - sum_t m_t log p(x_t | x_<t) / sum_t m_t

with m_t = 1 on completion tokens and the closing EOS (`completion_only_loss=true`, the default:
the prompt is given, not learned) or on every real token (`false`). Padding never counts.

Lightning does the rest: gradient accumulation (`trainer.accumulate_grad_batches`), precision, and
clipping via `max_grad_norm` (through `configure_gradient_clipping`, so the value lives with the
stage). Caveat of accumulation: each micro-batch is a token mean, so micro-batches with fewer
tokens weigh a little more than under one big batch.

Validation: token-weighted loss and perplexity (torchmetrics), then held-out sampling scored by the
data's evaluator when it has one (`eval/gold_score` on the demo) with a sample table in TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lightrlhf.data.modules import SFTDataModule
from lightrlhf.models.causal_lm import CausalLM
from lightrlhf.models.export import export_causal_lm
from lightrlhf.rollouts.heldout import response_stats, sample_texts
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.stages.base import StageModule
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.training.reporting import log_data_summary, markdown_table

log = logging.getLogger(__name__)
IGNORE = -100


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token NLL over positions where loss_mask is 1, number of such tokens)."""
    targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    tokens = (targets != IGNORE).sum()
    return nll / tokens.clamp(min=1), tokens


def scored_tail(loss_mask: torch.Tensor) -> int:
    """How many trailing positions' logits the loss reads. Position t predicts token t + 1, so from the
    position before the first token any row scores to the end; all T when none is scored. With a
    completion-only loss on prompt + completion rows that is about the completion's share: the LM
    head (a [hidden, vocabulary] product per position, and its backward) runs on those alone."""
    scored = loss_mask[:, 1:].any(0)
    if not scored.any():
        return loss_mask.shape[1]
    return loss_mask.shape[1] - int(scored.nonzero()[0])


class SFTStage(StageModule):
    default_metric = "val/loss"  # what `train.py` returns to a sweeper unless optimized_metric says otherwise
    stage_name = "sft"

    def __init__(self, model: CausalLM, datamodule: SFTDataModule, optim: OptimizerSpec = OptimizerSpec(lr=2e-3),
                 scheduler: SchedulerSpec = SchedulerSpec(name="cosine", warmup_steps=20),
                 completion_only_loss: bool = True, max_grad_norm: float | None = 1.0,
                 generation: GenerationSpec | None = None, eval: EvalSpec | None = None,
                 numerics: NumericsSpec | None = None):
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        self.model, self.datamodule = model, datamodule
        self.completion_only_loss = completion_only_loss
        self.generation, self.eval_spec = generation or GenerationSpec(), eval or EvalSpec()
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=IGNORE)
        self.eval_results: dict[str, float] = {}  # latest held-out sampling metrics
        self.initial_eval: dict[str, float] = {}  # the same, before any training step

    # -- training -----------------------------------------------------------------------------
    def _loss_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["completion_mask"] if self.completion_only_loss else batch["token_mask"]

    def _logits(self, batch: dict[str, torch.Tensor], last: int = 0) -> torch.Tensor:
        """[B, T, V]; with `last` > 0 the last `last` positions' only (the LM head runs on those alone)."""
        if "position_ids" in batch:  # packed rows (data/modules.py pack_rows): the positions delimit the demonstrations
            return self.model(batch["input_ids"], None, position_ids=batch["position_ids"], logits_to_keep=last)
        return self.model(batch["input_ids"], batch["attention_mask"], logits_to_keep=last)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask, ids = self._loss_mask(batch), batch["input_ids"]
        keep = scored_tail(mask)  # the same loss and gradient with the LM head on the scored positions only
        loss, tokens = sft_loss(self._logits(batch, keep), ids[:, -keep:], mask[:, -keep:])
        if not self.guard.screen(self.global_step, loss=loss.detach()):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return None  # Lightning skips backward and the optimizer step for this batch
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._logits(batch)
        mask = self._loss_mask(batch)
        loss, tokens = sft_loss(logits, batch["input_ids"], mask)
        self.val_loss.update(loss, weight=tokens)
        targets = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        self.val_perplexity.update(logits[:, :-1].float(), targets)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.eval_results = self.evaluate_samples()
            self.last_validated_step = self.global_step

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live in training

    def on_train_start(self) -> None:
        if self.global_step == 0:
            log_data_summary(self.logger, self.datamodule.summary)
        if self.eval_spec.at_start and self.global_step == 0 and not self.initial_eval:
            self.initial_eval = self.evaluate_samples()

    # -- held-out sampling --------------------------------------------------------------------
    def evaluate_samples(self) -> dict[str, float]:
        prompts = self.datamodule.validation_prompts(self.eval_spec.num_prompts)
        if not prompts:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            texts, generations = sample_texts(self.model.module, self.model.tokenizer, prompts, self.generation,
                                              self.eval_spec.seed, self.eval_spec.batch_size)
        finally:
            self.model.train(was_training)
        metrics = {f"eval/{k}": v for k, v in response_stats(generations).items()}
        scores = None
        evaluator = self.datamodule.evaluator
        if evaluator is not None:
            scores = evaluator([t for _, t in prompts], texts)
            metrics[f"eval/{evaluator.name}"] = float(torch.tensor(scores).mean())
            metrics[f"eval/{evaluator.name}_std"] = float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0
        self._log_samples(prompts, texts, scores, metrics)
        return metrics

    def _log_samples(self, prompts, texts, scores, metrics: dict[str, float]) -> None:
        if self.logger is None:
            return
        self.logger.log_metrics(metrics, step=self.global_step)
        n = self.eval_spec.num_logged
        experiment = getattr(self.logger, "experiment", None)
        if n and hasattr(experiment, "add_text"):
            name = getattr(self.datamodule.evaluator, "name", None)
            header = ["prompt", "completion"] + ([name] if scores is not None else [])
            rows = [[p, t] + ([s] if scores is not None else [])
                    for (_, p), t, s in zip(prompts[:n], texts[:n], (scores or [None] * n)[:n])]
            experiment.add_text("samples", markdown_table(header, rows), self.global_step)

    # -- optimisation and checkpoints ----------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_and_schedule(self.optim.build(self.named_trainable()),
                                           int(self.trainer.estimated_stepping_batches))

    def stage_state(self) -> dict[str, Any]:
        return {"initial_eval": dict(self.initial_eval), "eval": dict(self.eval_results)}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.initial_eval, self.eval_results = dict(state.get("initial_eval", {})), dict(state.get("eval", {}))

    # -- what the launcher reads ---------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        metrics = dict(self.eval_results)
        metrics.update({f"{k}_initial": v for k, v in self.initial_eval.items()})
        return metrics

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        return export_causal_lm(self.model, out_dir, stage="sft", config=config, metrics=metrics, merged=merged)

