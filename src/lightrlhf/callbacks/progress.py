"""A Rich progress bar that counts optimizer steps and shows the stage's key metrics.

Lightning's default describes progress in epochs ("Epoch 0/-2" when only max_steps is set); RLHF
runs are budgeted in steps, and PPO's batches are rollouts, so steps out of max_steps is what reads.
Only the metrics a stage marks `prog_bar=True` are shown.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        return f"step {trainer.global_step}/{total} (epoch {current_epoch})"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
