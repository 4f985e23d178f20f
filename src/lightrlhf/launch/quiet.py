"""Keep the console for what a researcher needs to read.

Known-harmless deprecation notices from dependencies, and Lightning's advertising tips, are
filtered by exact message; everything else (including all of our own warnings) still shows.
Informational logs go to stdout and the run's log file; stderr is kept for warnings and errors.
"""

from __future__ import annotations

import logging
import warnings

_HARMLESS_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated",  # transformers, asked by peft
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning on torch >= 2.10
    r"The '\w+_dataloader' does not have many workers",  # num_workers=0 is right for small data here
    r".*torch.utils._pytree._register_pytree_node",
    r"Found \d+ module\(s\) in eval mode",  # PPO keeps dropout off on purpose (stages/ppo.py)
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet() -> None:
    for pattern in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        # Lightning gives its loggers a stderr handler of their own; let them go through Hydra's
        # handlers instead (console on stdout and the run's train.log), so stderr is for errors.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
