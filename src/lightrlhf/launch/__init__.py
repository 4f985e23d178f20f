"""The glue between Hydra and the library: the only package that imports Hydra.

Everything under `lightrlhf.data`, `models`, `stages`, `rl` and `demo` takes plain arguments and
typed objects; this package composes configs, builds the parts and runs them. Importing it is
cheap (no torch): `--help` and config errors answer before the heavy libraries load.
"""

from __future__ import annotations

from typing import Any

from lightrlhf.launch import resolvers
from lightrlhf.launch.cli import cli

resolvers.register()


def run(cfg: Any) -> float | None:
    """See `lightrlhf.launch.run.run`."""
    from lightrlhf.launch.quiet import quiet
    from lightrlhf.launch.run import run as run_composed

    quiet()
    return run_composed(cfg)


__all__ = ["cli", "run"]
