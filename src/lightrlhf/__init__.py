"""lightrlhf: RLHF on PyTorch Lightning, driven by Hydra configs."""

__version__ = "0.1.0"
