"""`python -m lightrlhf.data report data=<data> ...`: the data report, composed by Hydra like a stage
(conf/report.yaml: paths, demo, model and data groups, and the `report` node)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightrlhf.errors import UserError
from lightrlhf.launch.build import build
from lightrlhf.launch.cli import cli, exit_for_user_error

log = logging.getLogger("lightrlhf")
CONF = Path(__file__).resolve().parents[3] / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="report")
def _report(cfg: DictConfig) -> None:
    from lightrlhf.data.report import build_report, log_report, write_report
    from lightrlhf.launch.quiet import quiet
    from lightrlhf.launch.run import to_plain
    from lightrlhf.models.loading import load_tokenizer

    quiet()
    try:
        plain = to_plain(cfg)
        spec = build(plain["report"], "report")
        source = build(plain["data"], "data")
        tokenizer = load_tokenizer(build(plain["model"], "model"))
        result = build_report(source, tokenizer, spec)
    except UserError as error:
        exit_for_user_error(error)  # SystemExit passes through Hydra, which would print a traceback for this
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    written = write_report(result, out_dir, spec.plots)
    log_report(result)
    log.info("wrote %s", ", ".join(str(p) for p in written))


def main(argv: list[str]) -> None:
    """`argv`: what follows `report` on the command line (Hydra overrides)."""
    sys.argv = [f"{sys.argv[0]} report", *argv]
    cli(_report)
