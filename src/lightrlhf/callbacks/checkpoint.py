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

Curves: a checkpoint is written in `on_train_batch_end`, before Lightning hands that batch's
metrics to the loggers (and its `epoch`), so a run killed right after it would lose that one point.
The checkpoint therefore carries those metrics and their logging step, with what the loggers were
already given at that step (the learning rate, which `LearningRateMonitor` logs when the batch
starts); the resumed run hides every event from that step on (`purge_step`, see `logging_step_of`),
writes the carried point again and continues: each step appears once, none is missing.

Reading: `read_checkpoint` proves a file is a complete checkpoint cheaply (memory-mapped, the tensors
stay on disk); `set_aside` renames a damaged one so that it is never picked again.

Interruptions: Ctrl-C (SIGINT) and SIGTERM (what a cluster scheduler sends before it kills a job)
are caught while training; at the end of the current batch -- a consistent state, never halfway
through an optimizer step -- a checkpoint is written and training stops. `run()` then exits with
a message saying how to resume (status 130 for SIGINT, 143 for SIGTERM). A second Ctrl-C stops
at once. A checkpoint is never written with non-finite weights.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from lightrlhf.io import atomic_write
from lightrlhf.training.reporting import writes_step_metrics
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


class UnreadableCheckpoint(Exception):
    """A file that does not load as a checkpoint (truncated, emptied, not one at all)."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        super().__init__(f"{path}: not a readable checkpoint ({reason})")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint in `path`, its tensors memory-mapped (left on disk until used): cheap proof that
    the file is complete, and its bookkeeping (`logging_step_of`, `elapsed_of`) without loading it."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableCheckpoint(path, "empty file")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UnreadableCheckpoint:
        raise
    except Exception as error:  # a torn zip, a foreign pickle, a vanished file: each fails its own way
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UnreadableCheckpoint(path, reason.split(". ")[0]) from None  # torch goes on with advice


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged`: kept for a look, never picked again."""
    target = path.with_name(path.name + ".damaged")
    os.replace(path, target)
    return target


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; the message says how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PeriodicCheckpoint(Callback):
    def __init__(self, dirpath: str, every_n_steps: int = 50, keep_last: int = 2, save_on_train_end: bool = True,
                 save_on_signal: bool = True):
        positive("every_n_steps", every_n_steps)
        positive("keep_last", keep_last)
        self.dirpath, self.every_n_steps, self.keep_last = Path(dirpath), every_n_steps, keep_last
        self.save_on_train_end, self.save_on_signal = save_on_train_end, save_on_signal
        self._last_saved_step = -1
        self._carried_logs: dict[str, Any] | None = None
        self._logged = LoggedAtStep()
        # wall time: this launch's start (the launcher sets it) and the launches' before it, up to the
        # checkpoint this one resumed from; a checkpoint records their sum (`elapsed_of`)
        self.launched_at = time.perf_counter()
        self.elapsed_before = 0.0
        self.received_signal: int | None = None
        self.interrupted_at: Path | None = None
        self._previous_handlers: dict[int, Any] = {}

    @property
    def state_key(self) -> str:
        return "PeriodicCheckpoint"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            self._logged.watch(logger)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved_step = trainer.global_step  # a resumed run does not re-save its start
        if self._carried_logs and self._carried_logs["metrics"]:
            for logger in trainer.loggers:
                logger.log_metrics(self._carried_logs["metrics"], step=self._carried_logs["step"])
        self._carried_logs = None
        if self.save_on_signal:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received_signal = signum
        log.warning("received %s: stopping after this batch with a checkpoint", signal.Signals(signum).name)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.received_signal is not None and self.interrupted_at is None:
            self.interrupted_at = self.save(trainer) if step != self._last_saved_step else latest_checkpoint(self.dirpath)
            trainer.should_stop = True
            return
        if step // self.every_n_steps > max(self._last_saved_step, 0) // self.every_n_steps:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.save_on_train_end and trainer.global_step != self._last_saved_step:
            self.save(trainer, batch_end=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def interruption(self, run_dir: Path) -> RunInterrupted | None:
        """What to tell the user when training stopped on a signal (None if it did not)."""
        if self.received_signal is None:
            return None
        name = signal.Signals(self.received_signal).name
        saved = f"saved {self.interrupted_at}" if self.interrupted_at else "no checkpoint yet"
        return RunInterrupted(f"interrupted by {name}: {saved}; continue with: python train.py resume={run_dir}",
                              128 + self.received_signal)

    def save(self, trainer: L.Trainer, batch_end: bool = True) -> Path:
        check_finite_weights(trainer)
        path = self.dirpath / f"step-{trainer.global_step:08d}.ckpt"
        self._last_saved_step = trainer.global_step
        self._carried_logs = self._points_to_carry(trainer) if batch_end else None
        try:
            trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, RNG
        finally:
            self._carried_logs = None
        if trainer.is_global_zero:
            for old in checkpoint_files(self.dirpath)[:-self.keep_last]:
                old.unlink(missing_ok=True)
        log.debug("saved %s", path)
        return path

    def _points_to_carry(self, trainer: L.Trainer) -> dict[str, Any]:
        """The points of this batch's logging step: those already logged, and the batch's own."""
        batch = unlogged_batch_metrics(trainer)
        return {"step": batch["step"], "metrics": {**self._logged.at(batch["step"]), **batch["metrics"]}}

    def state_dict(self) -> dict[str, Any]:
        state = {"rng": rng_state(), "last_saved_step": self._last_saved_step,
                 "elapsed_s": self.elapsed_before + time.perf_counter() - self.launched_at}
        if self._carried_logs is not None:
            state["carried_logs"] = self._carried_logs
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict["rng"])
        self._carried_logs = state_dict.get("carried_logs")
        self.elapsed_before = float(state_dict.get("elapsed_s", 0.0))


class LoggedAtStep:
    """What the loggers were given at the newest logging step, whoever logged it (the stage, Lightning,
    `LearningRateMonitor` at the batch's start): a checkpoint written during that step carries it,
    since the run resumed from the checkpoint hides that step's events."""

    def __init__(self) -> None:
        self.step, self.metrics = -1, {}

    def watch(self, logger: Any) -> None:
        log_metrics = logger.log_metrics
        if getattr(log_metrics, "noted_by", None) is self:
            return

        def noted(metrics: dict[str, Any], step: int | None = None) -> None:
            if step is not None:
                self.note(metrics, step)
            log_metrics(metrics, step)

        noted.noted_by = self
        logger.log_metrics = noted

    def note(self, metrics: dict[str, Any], step: int) -> None:
        if step != self.step:
            self.step, self.metrics = step, {}
        self.metrics.update({k: float(v) for k, v in metrics.items()
                             if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)})

    def at(self, step: int) -> dict[str, float]:
        return dict(self.metrics) if step == self.step else {}


def unlogged_batch_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """This batch's step metrics and their logging step, which Lightning sends to the loggers only
    after `on_train_batch_end` (`_logger_connector.update_train_step_metrics`, which adds `epoch`);
    empty when this batch logs nothing (accumulating, or between `log_every_n_steps`)."""
    connector = trainer._logger_connector
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    accumulating = trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization
    if accumulating or not writes_step_metrics(trainer):
        return {"step": step, "metrics": {}}
    metrics = {k: float(v) for k, v in connector.metrics["log"].items() if not torch.is_tensor(v) or v.numel() == 1}
    if metrics:
        metrics.setdefault("epoch", float(trainer.current_epoch))  # as `LoggerConnector.log_metrics` does
    return {"step": step, "metrics": metrics}


def logging_step_of(checkpoint: dict[str, Any]) -> int:
    """The first logging step a run resumed from `checkpoint` writes: events at or after it from the
    killed run are hidden. A checkpoint from `on_train_batch_end` carries its batch's point (written
    again on resume) at the loop's `_batches_that_stepped`; one from the end of training comes after
    its last point, and Lightning continues at the same counter."""
    carried = (checkpoint.get("callbacks") or {}).get("PeriodicCheckpoint", {}).get("carried_logs")
    if carried is not None:
        return int(carried["step"])
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", checkpoint.get("global_step", 0)))


def elapsed_of(checkpoint: dict[str, Any]) -> float:
    """Wall time spent on the run up to `checkpoint`, over all its launches (0 if not recorded)."""
    return float((checkpoint.get("callbacks") or {}).get("PeriodicCheckpoint", {}).get("elapsed_s", 0.0))


def check_finite_weights(trainer: L.Trainer) -> None:
    """Refuse to write a checkpoint whose trainable weights hold NaN/inf: the last good one stays."""
    from lightrlhf.training.numerics import NumericFault

    module = trainer.lightning_module
    names = getattr(module, "trainable_parameter_names", lambda: [])()
    table = dict(module.named_parameters())
    for name in names:
        if not bool(torch.isfinite(table[name]).all()):
            raise NumericFault(f"step {trainer.global_step}: weight {name} is not finite; no checkpoint written, "
                               f"the last one in {trainer.default_root_dir}/checkpoints is the last good state")
