"""Checkpoints hold what trains, never the frozen base.

A LightningModule's `state_dict` includes every weight it owns, the frozen base model included;
for a 1B-parameter base and a 4M-parameter adapter that is 250x what resuming needs. Stages call
`keep_trainable` from `on_save_checkpoint` and `check_trainable` from `on_load_checkpoint` (and set
`strict_loading = False`, since the base is absent on purpose). The names come from the stage's
roles, not from `requires_grad`.
"""

from __future__ import annotations

from typing import Any

from lightrlhf.errors import UserError


def keep_trainable(checkpoint: dict[str, Any], names: list[str]) -> None:
    wanted = set(names)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in wanted}


def check_trainable(checkpoint: dict[str, Any], names: list[str]) -> None:
    """The checkpoint must hold exactly the trainable weights this stage was built with."""
    stored, wanted = set(checkpoint.get("state_dict", {})), set(names)
    if stored != wanted:
        missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
        detail = []
        if missing:
            detail.append(f"{len(missing)} trainable weights missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
        raise UserError("the checkpoint does not match this model: " + "; ".join(detail) +
                        " -- was it written with another model or LoRA config?")
