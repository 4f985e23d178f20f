"""The stage contract: what `launch/run.py` may ask of any stage, and the parts every stage shares.

A stage is a LightningModule built from config (`conf/stage/<name>.yaml`, `_target_` = its class)
with its model, data module and settings passed to its constructor. Beyond Lightning's own hooks,
the launcher relies on exactly what `Stage` declares:

    default_metric          the metric `train.py` returns to a sweeper (unless optimized_metric says)
    last_validated_step     the optimizer step of the newest validation (-1: none yet); when it is
                            not the final step the launcher validates once more, so the final
                            metrics describe the final weights
    final_metrics()         metrics measured by the stage itself (held-out sampling, counters)
    export(out_dir, ...)    a Hugging Face-format directory the next stage can load
    trainable_parameter_names()   what checkpoints hold (never the frozen base)

`StageModule` implements the shared part once: checkpoints that hold only the trainable weights
plus the stage's own state (`stage_state` / `load_stage_state`), AdamW with the configured
schedule over named parameter groups, and NaN-guarded gradient clipping. Adding a stage is one
subclass in `stages/` and one YAML in `conf/stage/`.

A stage that trains nothing (best-of-n) keeps `SamplingStage` instead: built the same way, it is
`run(out_dir)` by the launcher (launch/sampling.py) in place of a fit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from torch import nn

from lightrlhf.training import distributed
from lightrlhf.training.checkpointing import check_trainable, keep_trainable
from lightrlhf.training.numerics import NonFiniteGuard, NumericsSpec, gradient_norm, guard_and_clip
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.validation import positive

STATE_KEY = "lightrlhf"  # where a stage's own state sits in a Lightning checkpoint


@runtime_checkable
class Stage(Protocol):
    default_metric: str | None
    last_validated_step: int

    def final_metrics(self) -> dict[str, float]: ...

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path: ...

    def trainable_parameter_names(self) -> list[str]: ...


@runtime_checkable
class SamplingStage(Protocol):
    """A stage that trains nothing (best-of-n): built from config like any stage, then the launcher
    calls `run(out_dir)` instead of fitting. It writes its own outputs into `out_dir` and returns what
    `metrics.json` reports beside the run's status: `{"metrics": {name: value}, ...}`; `default_metric`
    is one of those metrics."""

    default_metric: str | None

    def run(self, out_dir: Path) -> dict[str, Any]: ...


class StageModule(L.LightningModule):
    """Base of the shipped stages (see module docstring). Subclasses set `default_metric`, hold their
    trainable model in `self.model` (anything with `trainable_parameter_names()`), and implement
    `final_metrics`, `export`, and -- when they keep state of their own -- `stage_state` and
    `load_stage_state`."""

    default_metric: ClassVar[str | None] = None
    stage_name: ClassVar[str] = "stage"
    # how the stage runs on several processes (trainer=ddp):
    #   lightning  Lightning's DDP wrapper syncs the gradients (one backward pass a step: SFT, RM, DPO)
    #   stage      the stage sums its gradients over the ranks itself, once per optimizer step, and takes
    #              its statistics over every rank's rows (PPO, GRPO, RLOO: training/distributed.py)
    #   none       one process only: several backward passes a step, each through part of the weights,
    #              which Lightning's DDP reducer does not allow; trainer=ddp is refused in one line
    data_parallel: ClassVar[Literal["lightning", "stage", "none"]] = "lightning"

    def __init__(self, optim: OptimizerSpec, scheduler: SchedulerSpec, max_grad_norm: float | None,
                 numerics: NumericsSpec | None) -> None:
        super().__init__()
        if max_grad_norm is not None:
            positive("max_grad_norm", max_grad_norm)
        self.optim, self.scheduler, self.max_grad_norm = optim, scheduler, max_grad_norm
        self.guard = NonFiniteGuard(numerics, self.stage_name)
        if self.guard.spec.on_nonfinite == "skip":
            # a skipped batch is a training_step that returns None on purpose: Lightning's warning
            # about that would only put a second line beside the one the guard writes
            warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
        self.strict_loading = False  # checkpoints hold only the trainable weights, on purpose
        self.last_validated_step = -1

    def setup(self, stage: str) -> None:
        if self.data_parallel == "lightning" or self.trainer is None or self.trainer.world_size == 1:
            return
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

        from lightrlhf.errors import UserError

        if self.data_parallel == "none":
            raise UserError(f"config trainer: stage={self.stage_name} runs on one process; use trainer=default or "
                            "trainer=gpu (stage=ppo, grpo and rloo run under trainer=ddp)")
        strategy = self.trainer.strategy
        if not isinstance(strategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
            raise UserError(f"config trainer: stage={self.stage_name} runs on several processes with trainer=ddp "
                            f"only (each rank rolls out its own prompts), not {type(strategy).__name__}")

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.data_parallel == "stage" and distributed.world_size() > 1:
            # the DDP wrapper's reducer stays out of every backward: the stage sums the gradients over
            # ranks itself, once per optimizer step (`minibatch_step`)
            with self.trainer.strategy.block_backward_sync():
                return super().manual_backward(loss, *args, **kwargs)
        return super().manual_backward(loss, *args, **kwargs)

    # -- what trains ---------------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        return [f"model.{n}" for n in self.model.trainable_parameter_names()]

    def named_trainable(self, keep=lambda name: True) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the trainable weights whose name passes `keep`, in a stable order."""
        table = dict(self.named_parameters())
        return [(n, table[n]) for n in self.trainable_parameter_names() if keep(n)]

    def optimizer_and_schedule(self, groups: list[dict], total_steps: int) -> dict[str, Any]:
        """`configure_optimizers`' answer: AdamW over `groups` (from `self.optim.build`), stepped schedule."""
        optimizer = self.optim.adamw(groups)
        scheduler = self.scheduler.build(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        guard_and_clip(self, optimizer, gradient_clip_val if gradient_clip_val is not None else self.max_grad_norm)

    def minibatch_step(self, optimizer: Any, scheduler: Any, params: list, losses: torch.Tensor,
                       merged: dict[str, float], stats: dict[str, list[float]]) -> bool:
        """The end of one minibatch, PPO's, GRPO's and PbRL's alike: the NaN guard on its losses and gradient
        norm (a non-finite one skips the step, the weights stay finite), its stats recorded, clipping,
        exactly one optimizer step and the schedule's. False when the step was skipped.

        Under trainer=ddp (the online stages) the gradients are first summed over the ranks, whose losses
        were divided by the global minibatch's count (training/distributed.py)."""
        if self.data_parallel == "stage":
            distributed.sum_gradients(params)
        grad_norm = gradient_norm(params)
        if not self.guard.check(self.global_step, loss=losses, gradient_norm=grad_norm):
            optimizer.zero_grad()
            return False
        merged["policy/grad_norm"] = grad_norm.item()
        for key, value in merged.items():
            stats.setdefault(key, []).append(value)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return True

    # -- checkpoints ---------------------------------------------------------------------------
    def stage_state(self) -> dict[str, Any]:
        """The stage's own state for the checkpoint (plain Python values and tensors)."""
        return {}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        """Restore what `stage_state` returned."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable(checkpoint, self.trainable_parameter_names())
        checkpoint[STATE_KEY] = {**self.stage_state(), "numerics": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable(checkpoint, self.trainable_parameter_names())
        state = checkpoint.get(STATE_KEY, {})
        if "numerics" in state:
            self.guard.load_state_dict(state["numerics"])
        self.load_stage_state(state)

    # -- what the launcher reads ---------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        raise NotImplementedError
