"""The run record, and what `resume=<dir>` does with it.

A run directory holds exactly one run. When its first training batch starts -- the run has been
built: its parts, Lightning's setup, any checkpoint restored -- it is claimed with

    run.json       the overrides the run was launched with, its config-group choices, launch count
    config.yaml    the composed config (interpolations as written)

A run that fails before that leaves the directory as it found it (`unclaimed_on_failure`), so the
corrected command runs there. `resume=<dir>` re-composes the config from the overrides recorded in
`run.json` plus the ones given now -- so `python train.py resume=<dir> trainer.max_steps=400` is
enough -- and continues from the newest checkpoint in `<dir>/checkpoints` that loads (`start_point`).
A resumed run may not switch what it *is* (its stage, model or data): that is a new run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightrlhf.errors import ConfigError, UserError
from lightrlhf.io import atomic_write_text
from lightrlhf.launch.relaunch import is_rank_zero

log = logging.getLogger("lightrlhf")
RUN_RECORD = "run.json"
CONFIG_FILE = "config.yaml"
# Config groups that define what a run *is*; a resumed run may not switch them.
IDENTITY_GROUPS = ("stage", "model", "data", "env")


def override_key(text: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text).key_or_group


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_RECORD
    if not path.is_file():
        raise UserError(f"resume={run_dir}: no run to resume there (no {RUN_RECORD}; "
                        "is it the directory of a lightrlhf run?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: unreadable run record ({error})") from None


def check_resumable(resume: str) -> None:
    """`resume=<dir>` names a run's directory: checked before anything is created or written there."""
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"resume={resume}: no such directory")
    read_record(path)


def write_record(run_dir: Path, overrides: list[str], choices: dict[str, Any], cfg: DictConfig) -> None:
    record = {"overrides": [o for o in overrides if override_key(o) != "resume"],
              "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")}}
    previous = run_dir / RUN_RECORD
    if previous.exists():
        record["launches"] = json.loads(previous.read_text(encoding="utf-8")).get("launches", 1) + 1
    else:
        record["launches"] = 1
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    atomic_write_text(previous, json.dumps(record, indent=1, ensure_ascii=False))


@contextlib.contextmanager
def unclaimed_on_failure(run_dir: Path, loggers: list[Any]) -> Iterator[None]:
    """A run that fails before it claims `run_dir` (an error Lightning's setup or the stage's start
    finds, a checkpoint that does not fit) removes what its loggers made inside `run_dir` (tb/), so
    that the directory holds no trace of a run and the corrected command can run there."""
    try:
        yield
    except BaseException:
        if is_rank_zero() and not (run_dir / RUN_RECORD).exists():
            made = [Path(d) for d in (getattr(logger, "log_dir", None) for logger in loggers) if d]
            for directory in made:
                if run_dir.resolve() in directory.resolve().parents:
                    shutil.rmtree(directory, ignore_errors=True)
        raise


def unclaim(run_dir: Path) -> None:
    """Remove the run record from `run_dir` (a pipeline none of whose steps claimed its directory)."""
    for name in (RUN_RECORD, CONFIG_FILE):
        (run_dir / name).unlink(missing_ok=True)


def refuse_existing_run(run_dir: Path) -> None:
    from lightrlhf.callbacks.checkpoint import checkpoint_files

    if (run_dir / RUN_RECORD).exists() or checkpoint_files(run_dir / "checkpoints"):
        raise UserError(f"{run_dir} already holds a run; continue it with resume={run_dir}, "
                        "or choose a new hydra.run.dir")


def identity_change(current: list[str], choices: dict[str, Any]) -> str | None:
    """The first group of IDENTITY_GROUPS that an override in `current` switches away from `choices`."""
    for text in current:
        key = override_key(text)
        if key in IDENTITY_GROUPS and "=" in text and text.split("=", 1)[1] != str(choices.get(key)):
            return key
    return None


def merged_overrides(previous: list[str], current: list[str], choices: dict[str, Any]) -> list[str]:
    """The recorded overrides with the current ones applied on top (last one per key wins)."""
    current = [o for o in current if override_key(o) != "resume"]
    key = identity_change(current, choices)
    if key is not None:
        raise UserError(f"resume: cannot change {key} of an existing run "
                        f"(it was {key}={choices.get(key)}); start a new run instead")
    by_key: dict[str, str] = {}
    for text in previous + current:
        by_key.pop(override_key(text), None)
        by_key[override_key(text)] = text
    return list(by_key.values())


def with_recorded_overrides(argv: list[str]) -> list[str]:
    """`resume=<dir> stage.rollouts=400`: Hydra composes the config before `run` reads the run's record,
    and a key of the resumed run's stage or model is unknown to the default ones. The recorded
    overrides go first, so the first composition already has the run's config groups; the current ones
    follow and win. A change of an identity group (stage, model, data) is left for `run` to refuse."""
    given = argv[1:]
    resume = [a.split("=", 1)[1] for a in given if a.startswith("resume=")]
    if not resume or any(a in ("-m", "--multirun") for a in given):
        return argv
    overrides = [a for a in given if not a.startswith("-") and "=" in a]
    try:
        record = read_record(Path(resume[-1]).expanduser())
        recorded = {override_key(o): str(o) for o in record.get("overrides", [])}
        current = {override_key(a) for a in overrides}
    except Exception:  # no record, an unreadable one, a bad override: `run` or Hydra reports it in one line
        return argv
    if identity_change(overrides, record.get("choices", {})) is not None:
        return argv
    return argv[:1] + [text for key, text in recorded.items() if key not in current] + given


def this_run(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict[str, Any],
             config_name: str) -> tuple[DictConfig, list[str], dict[str, Any]]:
    """The config, overrides and config-group choices of the run about to start in `run_dir`:
    the given ones for a new run (in a directory that holds none), the recorded ones with the given
    ones on top for `resume=<dir>`."""
    resume = cfg.get("resume")
    if not resume:
        if is_rank_zero():  # the other DDP ranks join the run rank 0 has just recorded
            refuse_existing_run(run_dir)
        return cfg, overrides, choices
    if Path(str(resume)).expanduser().resolve() != run_dir.resolve():
        raise UserError(f"resume={resume} but the run directory is {run_dir}; "
                        "leave hydra.run.dir unset when resuming")
    record = read_record(run_dir)
    merged = merged_overrides(record.get("overrides", []), overrides, record.get("choices", {}))
    if merged != [o for o in overrides if override_key(o) != "resume"]:
        # detail: `train.py resume=<dir>` and the pipeline already compose from exactly these
        # overrides (see `with_recorded_overrides`); only a config that lacks some is composed again.
        cfg, choices = compose_config(merged, config_name)
    OmegaConf.update(cfg, "resume", str(run_dir), merge=False)
    return cfg, merged, choices


def compose_config(overrides: list[str], config_name: str) -> tuple[DictConfig, dict[str, Any]]:
    """The config `train.py <overrides>` runs (without Hydra's own node), and its config-group choices."""
    from hydra import compose
    from omegaconf import open_dict

    cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: the checkpoint it loads (None: the beginning), the TensorBoard step from
    which events already in its directory are hidden, and the wall time spent before (`elapsed_of`)."""

    checkpoint: Path | None = None
    purge_step: int = 0
    elapsed_s: float = 0.0


def start_point(run_dir: Path, resume: bool, ckpt_path: str | None) -> StartPoint:
    """A resumed run starts from its newest checkpoint that loads: a damaged one (truncated, emptied)
    is reported in one line and renamed `<name>.damaged`, and the one before it is tried. A new run
    starts from `ckpt_path` (one line if it does not load) or from the beginning. Events from
    `purge_step` on are hidden: those a killed run wrote after its checkpoint, or all of them when
    the run starts from the beginning (killed before its first checkpoint, or leftovers of a run that
    never claimed the directory)."""
    from lightrlhf.callbacks.checkpoint import (
        UnreadableCheckpoint,
        checkpoint_files,
        elapsed_of,
        logging_step_of,
        read_checkpoint,
        set_aside,
    )

    if resume:
        for path in reversed(checkpoint_files(run_dir / "checkpoints")):
            try:
                checkpoint = read_checkpoint(path)
            except UnreadableCheckpoint as damaged:
                if is_rank_zero():  # the other DDP ranks start after rank 0 has set it aside
                    with contextlib.suppress(OSError):  # a read-only directory: skipped all the same
                        set_aside(path)
                log.warning("resume: %s; set aside as %s.damaged, using the checkpoint before it", damaged, path.name)
                continue
            return StartPoint(path, logging_step_of(checkpoint), elapsed_of(checkpoint))
        log.warning("resume: no checkpoint in %s yet; starting this run from the beginning", run_dir)
        return StartPoint()
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError("ckpt_path", f"{path} is not a checkpoint file")
        try:
            checkpoint = read_checkpoint(path)
        except UnreadableCheckpoint as error:
            raise ConfigError("ckpt_path", str(error)) from None
        return StartPoint(path, logging_step_of(checkpoint), elapsed_of(checkpoint))
    return StartPoint()
