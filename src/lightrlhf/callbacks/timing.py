"""Steady-state throughput of the training loop, measured the way the peer benchmarks measure it.

What is measured: the wall clock (`time.perf_counter()`) at the end of every training batch, i.e.
after its optimizer step(s), together with `trainer.global_step`. For SFT and reward modelling a
batch is one optimizer step; for PPO it is one rollout + update iteration (several optimizer
steps). The first `warmup` batches are dropped (allocator growth, lazy initialisation, first-touch
page faults), and the steady-state rate is

    rate = (n - warmup) * units_per_step / (t_end[n] - t_end[warmup])

with n batches, t_end[k] the stamp after batch k (1-based), and `units_per_step` what one batch is
worth in the unit reported (2048 tokens, 16 pairs, 16 episodes ...). Start-up -- imports, model
load, tokenization, anything a stage does in `on_train_start` -- is outside the window by
construction. The rate over the whole loop (from the start of the first batch, warmup included)
is written too.

Why a callback: it times the real entry point (`python train.py ...`) with nothing changed but one
extra callback, added from the command line:

    +callbacks.timer._target_=lightrlhf.callbacks.timing.StepTimer +callbacks.timer.path=timer.json
    +callbacks.timer.units_per_step=2048 +callbacks.timer.unit=tokens/s

At `on_train_end` the stamps and both rates go to `path` as JSON (written atomically).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightrlhf.io import atomic_write_text
from lightrlhf.validation import non_negative, positive


@dataclass(frozen=True)
class Rates:
    rate: float | None  # steady state, first `warmup` batches dropped; None if too few batches
    rate_whole_loop: float | None  # every batch, from the start of the first one
    seconds_per_batch: float | None  # steady state
    batches: int


def steady_rate(ends: list[float], units_per_step: float, warmup: int, start: float | None = None) -> Rates:
    """Rates from the end-of-batch stamps `ends` (seconds, increasing) and the loop's `start`."""
    n = len(ends)
    rate = per_batch = whole = None
    if n > warmup:
        # detail: with warmup=0 the window opens at the loop's start, as in the peers' StepTimer.
        opened = ends[warmup - 1] if warmup > 0 else start
        if opened is not None and ends[-1] > opened:
            per_batch = (ends[-1] - opened) / (n - warmup)
            rate = units_per_step / per_batch
    if n and start is not None and ends[-1] > start:
        whole = n * units_per_step / (ends[-1] - start)
    return Rates(rate, whole, per_batch, n)


class StepTimer(Callback):
    def __init__(self, path: str, units_per_step: float, unit: str, warmup: int = 3):
        positive("units_per_step", units_per_step)
        non_negative("warmup", warmup)
        self.path, self.units_per_step, self.unit, self.warmup = Path(path), float(units_per_step), unit, warmup
        self.start: float | None = None
        self.ends: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # detail: the first batch's start, not on_train_start: work a stage does when training
        # starts (PPO's rollouts of the initial policy for the reward normaliser) is start-up.
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        self.steps.append(int(trainer.global_step))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            atomic_write_text(self.path, json.dumps(self.summary(), indent=1))

    def summary(self) -> dict[str, Any]:
        rates = steady_rate(self.ends, self.units_per_step, self.warmup, self.start)
        origin = self.start if self.start is not None else (self.ends[0] if self.ends else 0.0)
        return {"unit": self.unit, "units_per_step": self.units_per_step, "warmup": self.warmup,
                **asdict(rates), "global_step": self.steps[-1] if self.steps else 0,
                "torch_threads": torch.get_num_threads(),
                # [global_step, seconds since the first batch started] after every batch
                "stamps": [[s, round(t - origin, 6)] for s, t in zip(self.steps, self.ends)]}
