"""Reward modelling: a scalar head trained on preference pairs with the Bradley-Terry loss.

    P(chosen > rejected) = sigmoid(r(x, y_c) - r(x, y_r))        (Bradley & Terry 1952)
    L = -(1-eps) log sigmoid(d) - eps log sigmoid(-d) + c (r_c + r_r)^2,   d = r_c - r_r - m

Ouyang et al. 2022 (InstructGPT) sec. 3.5; the optional margin m from the data (Touvron et al.
2023, Llama 2), label smoothing eps for noisy labels, and reward centring c (Eisenstein et al.
2023) are described in `rl/preference.py`. Chosen and rejected go through the model as one
batched forward of 2B sequences.

What is logged (train per step, validation over the whole held-out set):
- `accuracy` (r_c > r_r), `loss`, `margin_mean` (mean r_c - r_r);
- `chosen_mean/std`, `rejected_mean/std`: where the rewards sit and how spread they are;
- `ece`: expected calibration error of sigmoid(r_c - r_r) as a probability of the label (both
  orientations of every pair, so the labels are balanced; 10 equal-width bins);
- length bias: `length_correlation` (Pearson r between reward and response length over all
  responses) and `accuracy_chosen_shorter` (accuracy on the pairs whose chosen answer is the
  shorter one -- a model that has learnt "longer is better" fails exactly these);
- with an evaluator (the demo): `gold_accuracy`, the accuracy against the hidden gold ranking, next
  to `annotator_gold_agreement`, how often the labels themselves agree with gold -- so a good RM
  can be told from an easy annotator.

An ensemble (`ensemble` = K > 1, rl/ensemble.py): K members, each a LoRA adapter and head on the one
frozen base, trained side by side. Member k weights pair i by its own Poisson(1) count w_ki (a
bootstrap resample fixed by `seed`), and each starts from its own random adapter and head, so that
their disagreement reflects what the labels leave open:

    L = sum_k L_k,   L_k = sum_i w_ki l_i(r_k) / sum_i w_ki        (l_i: the loss above, member k's rewards)

The members share no weight, so the sum trains each exactly as alone, and gradient clipping is per
member (`max_grad_norm` each). Why K adapters and not K heads on one shared adapter: heads on shared
features can only disagree about a linear read-out of the same representation, which the shared
adapter is pulled to fit for all of them at once, so their spread understates what the data leaves
open; separate adapters cost K forwards of the small model per batch, which is what the demo and a
LoRA run on a real model can afford. The metrics above are those of the members' mean (the reward
the export gives); `val/member<k>/{accuracy,loss,gold_accuracy}` are each member's, and

- `ensemble/margin_std`: mean over pairs of the members' std of r_c - r_r (train and val);
- `val/ensemble/disagreement`: mean over pairs of the std of sigmoid(r_c - r_r), what
  `stage=sample_pairs selection=disagreement` ranks by;
- `val/ensemble/reward_std`: mean over held-out responses of the members' std once their constant
  offsets are aligned (Bradley-Terry leaves each member's free); the export's heads carry that
  alignment, so `member_scores` of the export have the same std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchmetrics import CatMetric, MeanMetric, PearsonCorrCoef
from torchmetrics.classification import BinaryCalibrationError

from lightrlhf.data.modules import PreferenceDataModule
from lightrlhf.data.tokenize import prompt_text
from lightrlhf.errors import ConfigError
from lightrlhf.models.reward import RewardModel
from lightrlhf.rl.ensemble import align_offsets, bootstrap_weights, ensemble_mean_std, weighted_mean
from lightrlhf.rl.preference import bradley_terry_loss
from lightrlhf.stages.base import StageModule
from lightrlhf.training.numerics import NumericsSpec, guard_and_clip
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.training.reporting import log_data_summary, writes_step_metrics
from lightrlhf.validation import in_range, non_negative, positive


@dataclass(frozen=True)
class PreferenceLossSpec:
    use_margin: bool = True  # subtract the data's per-pair `margin` field when it has one
    label_smoothing: float = 0.0
    center_coefficient: float = 0.0

    def __post_init__(self) -> None:
        in_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        non_negative("center_coefficient", self.center_coefficient)


class RewardModelStage(StageModule):
    default_metric = "val/accuracy"
    stage_name = "rm"

    def __init__(self, model: RewardModel, datamodule: PreferenceDataModule,
                 optim: OptimizerSpec = OptimizerSpec(lr=1.5e-3),
                 scheduler: SchedulerSpec = SchedulerSpec(name="cosine", warmup_steps=20),
                 loss: PreferenceLossSpec | None = None,
                 max_grad_norm: float | None = 1.0, head_lr_scale: float = 1.0, numerics: NumericsSpec | None = None,
                 ensemble: int = 1, bootstrap: bool = True, seed: int = 0):
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        positive("head_lr_scale", head_lr_scale)
        positive("ensemble", ensemble)
        if model.ensemble_size != ensemble:
            raise ConfigError("stage.model.ensemble", f"the model has {model.ensemble_size} members but "
                                                      f"stage.ensemble={ensemble}; set stage.ensemble alone")
        self.model, self.datamodule = model, datamodule
        self.loss_spec, self.head_lr_scale = loss or PreferenceLossSpec(), head_lr_scale
        self.ensemble, self.bootstrap, self.seed = ensemble, bootstrap, seed
        self.val_loss = MeanMetric()
        kept = ["chosen", "rejected", "chosen_length", "rejected_length", "index"]
        if ensemble > 1:
            kept += ["member_chosen", "member_rejected", "margin"]  # [B, K] and [B]
        self.val_rewards = torch.nn.ModuleDict({k: CatMetric() for k in kept})
        self.val_results: dict[str, float] = {}
        self.member_offsets: torch.Tensor | None = None  # [K], from the newest validation (align_offsets)
        self._gold: torch.Tensor | None = None  # gold(chosen) - gold(rejected) per validation pair
        self._weights: torch.Tensor | None = None  # [K, pairs] bootstrap counts, by training pair index

    # -- steps ---------------------------------------------------------------------------------
    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards [K, B] of every member."""
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        return self.model.member_rewards(ids, mask).chunk(2, dim=1)

    def _loss(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, torch.Tensor],
              reduction: str = "mean") -> torch.Tensor:
        spec = self.loss_spec
        return bradley_terry_loss(chosen, rejected, batch["margin"] if spec.use_margin else None,
                                  label_smoothing=spec.label_smoothing, center_coef=spec.center_coefficient,
                                  reduction=reduction)

    def member_weights(self, index: torch.Tensor) -> torch.Tensor:
        """[K, B] how often each pair of the batch is in each member's resample (all 1 without bootstrap)."""
        if not self.bootstrap:
            return torch.ones(self.ensemble, len(index), device=index.device)
        if self._weights is None:
            size = max(f.index for f in self.datamodule.train_set.items) + 1
            self._weights = bootstrap_weights(self.ensemble, size, self.seed)
        return self._weights[:, index.cpu()].to(index.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_rewards(batch)
        if self.ensemble == 1:
            loss = self._loss(chosen[0], rejected[0], batch)
            shown = loss
        else:  # each member its own weighted mean over the batch; they share no weight, so the sum trains each alone
            member_losses = weighted_mean(self._loss(chosen, rejected, batch, reduction="none"),
                                          self.member_weights(batch["index"]))
            loss, shown = member_losses.sum(), member_losses.mean()
        if not self.guard.screen(self.global_step, loss=loss.detach(), rewards=torch.cat([chosen, rejected]).detach()):
            self.log("numerics/skipped_batches", float(self.guard.skipped_total))
            return None  # Lightning skips backward and the optimizer step for this batch
        self.log("train/loss", shown, prog_bar=True)
        if not writes_step_metrics(self._trainer):
            return loss
        batch_metrics = preference_metrics(chosen.detach().mean(0), rejected.detach().mean(0), batch["chosen_length"],
                                           batch["rejected_length"])
        if self.ensemble > 1:
            batch_metrics["ensemble/margin_std"] = ensemble_mean_std((chosen - rejected).detach())[1].mean().item()
        for name, value in batch_metrics.items():  # the held-out set's diagnostics, on each training batch
            self.log(f"train/{name}", value, prog_bar=name == "accuracy")
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        members_chosen, members_rejected = self.pair_rewards(batch)
        chosen, rejected = members_chosen.mean(0), members_rejected.mean(0)
        self.val_loss.update(self._loss(chosen, rejected, batch), weight=chosen.shape[0])
        kept = {"chosen": chosen, "rejected": rejected, "chosen_length": batch["chosen_length"],
                "rejected_length": batch["rejected_length"], "index": batch["index"]}
        if self.ensemble > 1:
            kept.update(member_chosen=members_chosen.T, member_rejected=members_rejected.T, margin=batch["margin"])
        for name, value in kept.items():
            self.val_rewards[name].update(value.float())

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._reset_validation()
            return
        if not self.val_rewards["chosen"].update_count:
            return  # an empty validation set: nothing to report
        values = {k: m.compute() for k, m in self.val_rewards.items()}
        values.update({k: values[k].reshape(-1) for k in ("chosen", "rejected", "chosen_length", "rejected_length",
                                                         "index")})
        results = preference_metrics(values["chosen"], values["rejected"], values["chosen_length"],
                                     values["rejected_length"])
        results["loss"] = self.val_loss.compute().item()
        gold = self.gold_differences()
        if gold is not None:
            gold = gold[values["index"].long()]
            decided = gold != 0
            diff = values["chosen"] - values["rejected"]
            results["gold_accuracy"] = ((diff[decided] > 0) == (gold[decided] > 0)).float().mean().item()
            results["annotator_gold_agreement"] = (gold[decided] > 0).float().mean().item()
        if self.ensemble > 1:
            results.update(self.member_metrics(values, gold))
        self.val_results = {f"val/{k}": v for k, v in results.items()}
        for name, value in self.val_results.items():
            self.log(name, value, prog_bar=name in ("val/accuracy", "val/gold_accuracy"))
        self.last_validated_step = self.global_step
        self._reset_validation()

    def member_metrics(self, values: dict[str, torch.Tensor], gold: torch.Tensor | None) -> dict[str, float]:
        """Each member's accuracy, loss and gold accuracy, and the ensemble's spread (module docstring);
        sets the offsets that align the members (exported with the heads)."""
        chosen, rejected = values["member_chosen"].T, values["member_rejected"].T  # [K, N]
        margin = values["margin"].reshape(-1)
        spec = self.loss_spec
        losses = bradley_terry_loss(chosen, rejected, margin if spec.use_margin else None,
                                    label_smoothing=spec.label_smoothing, center_coef=spec.center_coefficient,
                                    reduction="none").mean(1)
        out: dict[str, float] = {}
        diff = chosen - rejected
        for k in range(self.ensemble):
            out[f"member{k}/accuracy"] = (diff[k] > 0).float().mean().item()
            out[f"member{k}/loss"] = losses[k].item()
            if gold is not None:
                decided = gold != 0
                out[f"member{k}/gold_accuracy"] = ((diff[k][decided] > 0) == (gold[decided] > 0)).float().mean().item()
        both = torch.cat([chosen, rejected], dim=1)
        self.member_offsets = align_offsets(both.mean(1))
        out["ensemble/reward_std"] = ensemble_mean_std(both - self.member_offsets[:, None])[1].mean().item()
        out["ensemble/margin_std"] = ensemble_mean_std(diff)[1].mean().item()
        out["ensemble/disagreement"] = ensemble_mean_std(torch.sigmoid(diff))[1].mean().item()
        return out

    def _reset_validation(self) -> None:
        self.val_loss.reset()
        for metric in self.val_rewards.values():
            metric.reset()

    def gold_differences(self) -> torch.Tensor | None:
        """gold(chosen) - gold(rejected) for every validation pair, from the data's evaluator."""
        evaluator = self.datamodule.evaluator
        if evaluator is None:
            return None
        if self._gold is None:
            examples = self.datamodule.val_examples
            prompts = [prompt_text(self.model.tokenizer, e.prompt) for e in examples]
            chosen = evaluator(prompts, [e.chosen for e in examples])
            rejected = evaluator(prompts, [e.rejected for e in examples])
            self._gold = torch.tensor(chosen) - torch.tensor(rejected)
        return self._gold

    def on_fit_start(self) -> None:
        self.model.train()

    def on_train_start(self) -> None:
        if self.global_step == 0:
            log_data_summary(self.logger, self.datamodule.summary)

    # -- optimisation and checkpoints ----------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        def is_head(name: str) -> bool:
            return name.startswith("model.heads.")

        groups = (self.optim.build(self.named_trainable(lambda n: not is_head(n))) +
                  self.optim.build(self.named_trainable(is_head), self.head_lr_scale))
        return self.optimizer_and_schedule(groups, int(self.trainer.estimated_stepping_batches))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        limit = gradient_clip_val if gradient_clip_val is not None else self.max_grad_norm
        if self.ensemble == 1:
            guard_and_clip(self, optimizer, limit)
            return
        table = dict(self.named_parameters())
        groups = [[table[f"model.{name}"] for name in names] for names in self.model.member_parameter_names()]
        guard_and_clip(self, optimizer, limit, groups=groups)

    def stage_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"val": dict(self.val_results)}
        if self.member_offsets is not None:
            state["member_offsets"] = self.member_offsets.tolist()
        return state

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.val_results = dict(state.get("val", {}))
        if state.get("member_offsets") is not None:
            self.member_offsets = torch.tensor(state["member_offsets"])

    # -- what the launcher reads ---------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        return dict(self.val_results)

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        return self.model.save(out_dir, stage="rm", config=config, metrics=metrics,
                               offsets=self.member_offsets if self.ensemble > 1 else None)


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, chosen_length: torch.Tensor,
                       rejected_length: torch.Tensor) -> dict[str, float]:
    """Accuracy, reward statistics, calibration and length bias of a set of scored pairs."""
    diff = chosen - rejected
    both = torch.cat([chosen, rejected])
    lengths = torch.cat([chosen_length, rejected_length]).float()
    probabilities = torch.sigmoid(torch.cat([diff, -diff]))
    labels = torch.cat([torch.ones_like(diff), torch.zeros_like(diff)]).long()
    shorter = chosen_length < rejected_length
    out = {
        "accuracy": (diff > 0).float().mean().item(),
        "margin_mean": diff.mean().item(),
        "chosen_mean": chosen.mean().item(), "chosen_std": chosen.std().item() if len(chosen) > 1 else 0.0,
        "rejected_mean": rejected.mean().item(), "rejected_std": rejected.std().item() if len(rejected) > 1 else 0.0,
        "reward_mean": both.mean().item(), "reward_std": both.std().item() if len(both) > 1 else 0.0,
        "ece": BinaryCalibrationError(n_bins=10, norm="l1")(probabilities, labels).item(),
        "frac_chosen_shorter": shorter.float().mean().item(),
    }
    if len(both) > 2 and lengths.std() > 0 and both.std() > 0:
        out["length_correlation"] = PearsonCorrCoef()(both, lengths).item()
    if shorter.any():
        out["accuracy_chosen_shorter"] = (diff[shorter] > 0).float().mean().item()
    return out
