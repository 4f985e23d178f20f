"""Learning-rate schedules by hand, gradient clipping in the automatically optimised stages, the loss mask switch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_in_process

from lightrlhf.training.optim import SchedulerSpec


def _learning_rates(spec: SchedulerSpec, total_steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = spec.build(optimizer, total_steps)
    rates = []
    for _ in range(total_steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name,at_6", [("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
                                       ("linear", 0.1 + 0.9 * 0.75), ("constant", 1.0)])
def test_warmup_then_decay_to_the_floor_by_hand(name, at_6):
    # warmup 4 of 12 steps: (step + 1) / 5; then progress p = (step - 4) / 8 from 1 down to min_lr_ratio 0.1
    rates = _learning_rates(SchedulerSpec(name=name, warmup_steps=4, min_lr_ratio=0.1), 12)
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rates[6] == pytest.approx(at_6)
    assert rates[8] == pytest.approx(0.55 if name != "constant" else 1.0)  # p = 1/2: cosine and linear agree
    assert rates[12] == pytest.approx(0.1 if name != "constant" else 1.0)


def test_sft_gradients_reach_the_optimizer_clipped(tmp_path, monkeypatch):
    """stage.max_grad_norm is applied before every AdamW step (the gradient norms seen by the step)."""
    norms = []
    original = torch.optim.AdamW.step

    def step(self, closure=None):
        # Lightning passes a closure that runs backward and then the stage's clipping
        loss = closure() if closure is not None else None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        original(self)
        return loss

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_in_process(["stage=sft", "trainer.max_steps=3", "stage.max_grad_norm=1e-3", "stage.eval.num_prompts=4",
                    "trainer.val_check_interval=3"], tmp_path / "sft")
    assert len(norms) == 3 and max(norms) <= 1e-3 * (1 + 1e-4), norms


def test_whole_sequence_loss_when_completion_only_is_off(tiny_spec):
    from lightrlhf.stages.sft import SFTStage

    # token_mask: every real token (data/modules.py collate_sft; packed rows leave out each demonstration's first)
    batch = {"token_mask": torch.tensor([[1, 1, 1, 0]]), "completion_mask": torch.tensor([[0, 0, 1, 0]])}
    assert SFTStage(model=None, datamodule=None)._loss_mask(batch) is batch["completion_mask"]
    assert SFTStage(model=None, datamodule=None, completion_only_loss=False)._loss_mask(batch) is batch["token_mask"]


def test_skip_mode_stops_after_max_consecutive_skips_and_a_finite_batch_resets_the_run():
    from lightrlhf.training.numerics import NonFiniteGuard, NumericFault, NumericsSpec

    guard = NonFiniteGuard(NumericsSpec(on_nonfinite="skip", max_consecutive_skips=2), "rm")
    nan, fine = torch.tensor(float("nan")), torch.tensor(1.0)
    assert guard.check(1, loss=nan) is False and guard.check(2, loss=nan) is False
    assert guard.check(3, loss=fine) is True  # the run of skips is broken
    assert guard.check(4, loss=fine, gradient_norm=torch.tensor(float("inf"))) is False
    assert guard.check(5, loss=nan) is False
    with pytest.raises(NumericFault, match=r"^rm stage, step 6: loss is nan; 3 batches in a row were not finite "
                                           r"\(numerics.max_consecutive_skips=2\): stopping$"):
        guard.check(6, loss=nan)
    assert guard.skipped_total == 5
