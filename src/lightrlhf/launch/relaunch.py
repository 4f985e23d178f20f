"""DDP ranks: which rank this process is, and the command Lightning re-runs to start the others."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def is_rank_zero() -> bool:
    # Lightning's DDP launcher re-runs this script once per extra rank with these variables set.
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@contextlib.contextmanager
def rank_relaunch_command(run_dir: Path, overrides: list[str], resuming: bool) -> Iterator[None]:
    """Make the command Lightning's DDP launcher re-runs for each extra rank *this* single run.

    Lightning starts ranks 1..N-1 by re-running `sys.argv` with `hydra.run.dir=<HydraConfig run.dir>`.
    Inside a `-m` sweep that command is the whole sweep (each rank would start a sweep of its own)
    and the run.dir pattern names a new timestamped directory; inside a pipeline it is the whole
    pipeline. Here the command becomes this run's own overrides (resuming if this run resumes) and
    the run directory this run writes to, so every rank joins the same run in the same directory.

    Afterwards the process group is closed and the environment variables the launcher set are
    restored, so the next run of a sweep in this process starts its own ranks again.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    saved_argv, saved_environ = list(sys.argv), dict(os.environ)
    sys.argv = [saved_argv[0]] + list(overrides) + ([f"resume={run_dir}"] if resuming else [])
    hydra_cfg = HydraConfig.instance().cfg
    saved_dir = None
    run_node = hydra_cfg.hydra.run if hydra_cfg is not None else None
    if run_node is not None:
        with read_write(run_node), open_dict(run_node):
            saved_dir = run_node.dir
            run_node.dir = str(run_dir)
    try:
        yield
    finally:
        sys.argv = saved_argv
        if is_rank_zero() and "LOCAL_RANK" not in saved_environ:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(saved_environ)
        if run_node is not None:
            with read_write(run_node), open_dict(run_node):
                run_node.dir = saved_dir
