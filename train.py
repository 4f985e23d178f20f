"""lightrlhf's one entry point: `python train.py stage=<stage> model=<model> data=<data> [overrides]`."""

import sys

try:  # Ctrl-C while these load (seconds): one line and exit 130, as at any later moment (see cli)
    import hydra
    from omegaconf import DictConfig

    from lightrlhf.launch import cli, run
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    sys.exit(130)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    cli(main)
