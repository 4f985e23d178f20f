"""Periodic, atomic checkpoints that a killed run resumes from exactly.

Why not Lightning's `ModelCheckpoint`: it triggers when `global_step % n == 0`, and PPO advances the
global step by several optimizer steps per batch, so most multiples are skipped. Here a checkpoint
is written whenever the step *crosses* a multiple of `every_n_steps`, plus one at the end of
training. Files are `step-00000050.ckpt`; the newest `keep_last` are kept, older ones are removed
only after a newer one is safely on disk.

What a checkpoint holds beyond Lightning's own state (loops, optimizers, schedulers, dataloader
position): the RNG states of torch, numpy and Python, saved here as plain tensors and numbers so
that checkpoints load with `torch.load(weights_only=True)`.

`AtomicCheckpointIO` writes through `lightrlhf.io.atomic_write` (temp file, fsync, rename): a crash
or a SIGKILL while writing leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from lightrlhf.io import atomic_write
from lightrlhf.validation import positive

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = True) -> dict[str, Any]:
        # detail: weights_only=True -- a checkpoint is data, never code to run (no arbitrary pickle).
        return torch.load(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def checkpoint_files(directory: str | Path) -> list[Path]:
    """Complete step checkpoints in `directory`, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    files = checkpoint_files(directory)
    return files[-1] if files else None


class PeriodicCheckpoint(Callback):
    def __init__(self, dirpath: str, every_n_steps: int = 50, keep_last: int = 2, save_on_train_end: bool = True):
        positive("every_n_steps", every_n_steps)
        positive("keep_last", keep_last)
        self.dirpath, self.every_n_steps, self.keep_last = Path(dirpath), every_n_steps, keep_last
        self.save_on_train_end = save_on_train_end
        self._last_saved_step = -1

    @property
    def state_key(self) -> str:
        return "PeriodicCheckpoint"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved_step = trainer.global_step  # a resumed run does not re-save its start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step // self.every_n_steps > max(self._last_saved_step, 0) // self.every_n_steps:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end and trainer.global_step != self._last_saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        path = self.dirpath / f"step-{trainer.global_step:08d}.ckpt"
        self._last_saved_step = trainer.global_step
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, RNG
        if trainer.is_global_zero:
            for old in checkpoint_files(self.dirpath)[:-self.keep_last]:
                old.unlink(missing_ok=True)
        log.debug("saved %s", path)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(), "last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict["rng"])
