"""The parts of a run, built from the resolved config: the stage with its model and data module,
and the Lightning trainer with its callbacks and loggers.

Each part is built from its own top-level node (`model`, `data`, `policy`, ...), so an error names
the key the user typed (`model.lora.r`), not the place the stage refers to it from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightrlhf.errors import ConfigError
from lightrlhf.launch.build import build, locate, parameters

if TYPE_CHECKING:
    from lightrlhf.stages.base import Stage

# Top-level role blocks a stage may use (PPO: policy.init, value.init, reward.path ...); each is
# built from its own key so errors name it, and handed to the stage's model factory and the stage.
ROLE_BLOCKS = ("policy", "value", "reward", "numerics")


def build_stage(plain: dict[str, Any]) -> tuple[Stage, Any]:
    """(stage, its datamodule) from the `stage` and `data` nodes; the stage keeps the stage contract."""
    from lightrlhf.models.loading import load_tokenizer

    stage_node = dict(plain["stage"])
    spec = build(plain["model"], "model")
    tokenizer = load_tokenizer(spec)
    source = build(plain["data"], "data")
    datamodule = build(stage_node.pop("datamodule"), "stage.datamodule", source=source, tokenizer=tokenizer)
    datamodule.setup("fit")  # data errors surface before a large model is loaded
    roles = {k: build(plain[k], k) for k in ROLE_BLOCKS if plain.get(k) is not None}
    model_node = stage_node.pop("model")
    model = build(model_node, "stage.model", spec=spec, tokenizer=tokenizer,
                  **_accepted(model_node, roles, "stage.model"))
    stage = build(stage_node, "stage", model=model, datamodule=datamodule,
                  **_accepted(stage_node, roles, "stage"))
    _check_contract(stage, str(stage_node["_target_"]))
    return stage, datamodule


def _accepted(node: dict[str, Any], roles: dict[str, Any], key: str) -> dict[str, Any]:
    """The role blocks that the node's target takes as parameters."""
    params, _ = parameters(locate(str(node["_target_"]), key))
    return {k: v for k, v in roles.items() if k in params}


def _check_contract(stage: Any, target: str) -> None:
    from lightrlhf.stages.base import Stage

    if not isinstance(stage, Stage):
        members = list(Stage.__annotations__) + [n for n, v in vars(Stage).items()
                                                  if callable(v) and not n.startswith("_")]
        missing = [n for n in members if not hasattr(stage, n)]
        raise ConfigError("stage._target_", f"{target} does not implement the stage contract "
                                            f"(lightrlhf.stages.base.Stage): missing {', '.join(missing)}")


def build_trainer(plain: dict[str, Any], ckpt_path: Path | None):
    import torch

    from lightrlhf.callbacks.checkpoint import AtomicCheckpointIO, logging_step_of

    callbacks = [build(node, f"callbacks.{name}") for name, node in (plain.get("callbacks") or {}).items() if node]
    loggers = []
    for name, node in (plain.get("logger") or {}).items():
        if not node:
            continue
        extra = {}
        if ckpt_path is not None and str(node.get("_target_", "")).endswith("TensorBoardLogger"):
            # detail: events written after the checkpoint by the killed run are hidden, so the
            # resumed curve continues without a second copy of those steps.
            # mmap: only the bookkeeping is read here; Lightning reads the tensors when it restores
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            extra["purge_step"] = logging_step_of(checkpoint)
        loggers.append(build(node, f"logger.{name}", **extra))
    trainer_node = dict(plain["trainer"])
    plugins = list(trainer_node.pop("plugins", None) or []) + [AtomicCheckpointIO()]
    return build(trainer_node, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins)
