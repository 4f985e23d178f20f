"""Non-finite values: stop loudly at the first one, or skip the batch and count.

A NaN or inf in a loss, a reward, an advantage or a gradient norm is checked *before* the
optimizer step, so the weights never take a poisoned update and the checkpoints already on disk
stay the last good ones. `numerics.on_nonfinite=stop` (the default) ends the run with one line
naming the stage, the step and the quantity; `skip` drops that batch (no optimizer step), counts
it (`numerics/skipped_batches`) and stops only after `max_consecutive_skips` in a row.

What ends a run of skips is an optimizer step whose gradient norm was checked and finite: a loss
checked before its backward (`screen`) can skip a batch but, by passing, cannot vouch for it, since
its gradient may still be inf. A skipped batch has no gradient, so the gradient check after it
(Lightning still calls the clipping hook around a skipped step) has nothing to pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from lightrlhf.errors import UserError
from lightrlhf.validation import one_of, positive

log = logging.getLogger(__name__)


class NumericFault(UserError):
    """Training produced a NaN/inf; exit status 3 (a diverged run, not a malformed input)."""

    exit_code = 3


@dataclass(frozen=True)
class NumericsSpec:
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 3

    def __post_init__(self) -> None:
        one_of("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        positive("max_consecutive_skips", self.max_consecutive_skips)


class NonFiniteGuard:
    """`check(...)`/`screen(...)` are True when every quantity is finite; False means: skip this batch."""

    def __init__(self, spec: NumericsSpec | None, stage: str):
        self.spec, self.stage = spec or NumericsSpec(), stage
        self.skipped_total = 0
        self.skipped_in_a_row = 0

    def check(self, step: int, **quantities: torch.Tensor | float) -> bool:
        """The last check before an optimizer step: passing it ends a run of skipped batches."""
        if not self.screen(step, **quantities):
            return False
        self.skipped_in_a_row = 0
        return True

    def screen(self, step: int, **quantities: torch.Tensor | float) -> bool:
        """An early check (a loss before its backward): failing skips the batch; passing leaves the
        run of skips as it is, for the gradient still to be checked."""
        for name, value in quantities.items():
            tensor = torch.as_tensor(value)
            if not bool(torch.isfinite(tensor).all()):
                return self._fault(step, name, tensor)
        return True

    def _fault(self, step: int, name: str, value: torch.Tensor) -> bool:
        what = "nan" if bool(torch.isnan(value).any()) else "inf"
        where = f"{self.stage} stage, step {step}: {name} is {what}"
        if self.spec.on_nonfinite == "stop":
            raise NumericFault(f"{where}; stopped before the optimizer step, the last checkpoint is the last good "
                               "state (numerics.on_nonfinite=skip skips such batches instead)")
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.spec.max_consecutive_skips:
            raise NumericFault(f"{where}; {self.skipped_in_a_row} batches in a row were not finite "
                               f"(numerics.max_consecutive_skips={self.spec.max_consecutive_skips}): stopping")
        log.warning("%s; batch skipped (%d skipped so far)", where, self.skipped_total)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total, self.skipped_in_a_row = int(state["skipped_total"]), int(state["skipped_in_a_row"])


def gradient_norm(parameters) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def guard_and_clip(stage, optimizer, max_grad_norm: float | None, groups: list[list[torch.nn.Parameter]] | None = None
                   ) -> None:
    """`configure_gradient_clipping` of the automatically optimised stages (SFT, RM).

    Before the optimizer step: a non-finite gradient norm stops the run, or (skip mode) empties the
    step -- AdamW leaves a parameter without a gradient untouched; then the norm is clipped. Without
    any gradient, every batch of this step was skipped before its backward: nothing to check, and
    the run of skips goes on. `groups`: sets of parameters that share nothing (a reward ensemble's
    members), each clipped to `max_grad_norm` on its own, as if each were trained alone.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(p.grad is not None for p in params):
        return
    if not stage.guard.check(stage.global_step, gradient_norm=gradient_norm(params)):
        for param in params:
            param.grad = None
    if max_grad_norm is None:
        return
    if groups is None:
        stage.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        return
    for group in groups:  # gradients are unscaled by the precision plugin before this hook
        torch.nn.utils.clip_grad_norm_(group, max_grad_norm)
