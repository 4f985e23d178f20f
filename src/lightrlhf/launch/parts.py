"""The parts of a run, built from the resolved config: the stage with its model and data module,
and the Lightning trainer with its callbacks and loggers (and the callback that claims the run
directory once the run has been built).

Each part is built from its own top-level node (`model`, `data`, `policy`, ...), so an error names
the key the user typed (`model.lora.r`), not the place the stage refers to it from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback

from lightrlhf.errors import ConfigError
from lightrlhf.launch.build import build, locate, parameters, validate

if TYPE_CHECKING:
    from lightrlhf.launch.record import StartPoint
    from lightrlhf.stages.base import Stage

# Top-level role blocks a stage may use (PPO: policy.init, value.init, reward.path ...); each is
# built from its own key so errors name it, and handed to the stage's model factory and the stage.
ROLE_BLOCKS = ("policy", "value", "reward", "numerics")


def build_stage(plain: dict[str, Any]) -> tuple[Stage, Any]:
    """(stage, its datamodule) from the `stage` and `data` nodes; the stage keeps the stage contract.
    A control stage (one that takes an `env`: stage=pbrl) is built from the `stage` and `env` nodes
    instead, and has no datamodule (its loop is its own iterations). A stage node without `model` and
    `datamodule` (stage=label) is built from its own keys alone."""
    from lightrlhf.models.loading import load_tokenizer

    stage_node = dict(plain["stage"])
    if "env" in parameters(locate(str(stage_node["_target_"]), "stage"))[0]:
        return build_control_stage(plain), None
    if "model" not in stage_node and "datamodule" not in stage_node:
        roles = {k: build(plain[k], k) for k in ROLE_BLOCKS if plain.get(k) is not None}
        stage = build(stage_node, "stage", **_accepted(stage_node, roles, "stage"))
        _check_contract(stage, str(stage_node["_target_"]))
        return stage, None
    # the stage's own settings are checked (known keys, value types) before the data is read and the
    # model loaded: a misspelt loss type is one line in a second, not after tokenizing the data
    validate({k: v for k, v in stage_node.items() if k not in ("model", "datamodule")}, "stage",
             given=("model", "datamodule") + ROLE_BLOCKS)
    validate(stage_node["model"], "stage.model", given=("spec", "tokenizer") + ROLE_BLOCKS)
    validate(stage_node["datamodule"], "stage.datamodule", given=("source", "tokenizer"))
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


def build_control_stage(plain: dict[str, Any]) -> Stage:
    """A stage that learns in an environment (`env=cartpole`, `env=pendulum`) rather than from data."""
    if plain.get("env") is None:
        raise ConfigError("env", "this stage runs in an environment: choose one with env=cartpole or env=pendulum")
    env = build(plain["env"], "env")
    stage_node = dict(plain["stage"])
    stage = build(stage_node, "stage", env=env)
    _check_contract(stage, str(stage_node["_target_"]))
    return stage


def _accepted(node: dict[str, Any], roles: dict[str, Any], key: str) -> dict[str, Any]:
    """The role blocks that the node's target takes as parameters."""
    params, _ = parameters(locate(str(node["_target_"]), key))
    return {k: v for k, v in roles.items() if k in params}


def _check_contract(stage: Any, target: str) -> None:
    from lightrlhf.stages.base import SamplingStage, Stage

    if not isinstance(stage, (Stage, SamplingStage)):
        members = list(Stage.__annotations__) + [n for n, v in vars(Stage).items()
                                                  if callable(v) and not n.startswith("_")]
        missing = [n for n in members if not hasattr(stage, n)]
        raise ConfigError("stage._target_", f"{target} does not implement the stage contract "
                                            f"(lightrlhf.stages.base.Stage): missing {', '.join(missing)}")


def build_trainer(plain: dict[str, Any], start: StartPoint, launched_at: float, own_callbacks: list[Callback | None]):
    """`own_callbacks`: the launcher's own callbacks (claiming the run directory, the thread policy)."""
    from lightrlhf.callbacks.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint

    trainer_node = dict(plain["trainer"])
    if trainer_node.get("max_steps") == 0:
        raise ConfigError("trainer.max_steps", "must be > 0 (or -1: no step budget), got 0; nothing would be trained")
    callbacks = [build(node, f"callbacks.{name}") for name, node in (plain.get("callbacks") or {}).items() if node]
    for callback in callbacks:
        if isinstance(callback, PeriodicCheckpoint):
            callback.launched_at = launched_at  # its checkpoints record the run's wall time from there
    loggers = []
    for name, node in (plain.get("logger") or {}).items():
        if not node:
            continue
        extra = {}
        if str(node.get("_target_", "")).endswith("TensorBoardLogger"):
            # detail: events already in the directory from `purge_step` on are hidden -- those a killed
            # run wrote after its checkpoint, all of them when the run starts from the beginning -- so
            # the curves continue without a second copy of any step.
            extra["purge_step"] = start.purge_step
        loggers.append(build(node, f"logger.{name}", **extra))
    plugins = list(trainer_node.pop("plugins", None) or []) + [AtomicCheckpointIO()]
    return build(trainer_node, "trainer", callbacks=callbacks + [c for c in own_callbacks if c is not None],
                 logger=loggers or False, plugins=plugins)


class ClaimRunDirectory(Callback):
    """Claims the run directory (`claim`: the run record) when the first training batch starts: the
    run has been built by then -- its stage set up, optimizers configured, any checkpoint restored,
    its start-of-training evaluation done -- so a run that fails before never holds the directory."""

    def __init__(self, claim: Callable[[], None]):
        self._claim, self.claimed = claim, False

    def on_train_batch_start(self, *args: Any) -> None:
        self.claim()

    def claim(self) -> None:
        """Once; the launcher calls it after a fit that had no batch left to train."""
        if not self.claimed:
            self._claim()
            self.claimed = True
