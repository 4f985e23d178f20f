"""Optimizer and learning-rate schedule settings shared by the stages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightrlhf.validation import in_range, non_negative, one_of, positive


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW (Loshchilov & Hutter 2019). Weight decay applies to matrices only, never to biases/norms."""

    lr: float  # no default: each stage's YAML states its own
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        positive("lr", self.lr)
        non_negative("weight_decay", self.weight_decay)
        for beta in self.betas:
            in_range("betas", beta, 0.0, 0.999999)
        positive("eps", self.eps)

    def build(self, named_params: list[tuple[str, nn.Parameter]], lr_scale: float = 1.0) -> list[dict]:
        """Parameter groups for one set of weights (call once per role, then pass all to `adamw`)."""
        decay = [p for _, p in named_params if p.ndim >= 2]
        no_decay = [p for _, p in named_params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay, "lr": self.lr * lr_scale}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr": self.lr * lr_scale})
        return groups

    def adamw(self, groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps)


@dataclass(frozen=True)
class SchedulerSpec:
    """Linear warmup, then constant, cosine or linear decay to `min_lr_ratio * lr`."""

    name: Literal["constant", "cosine", "linear"]  # no default: each stage's YAML states its own
    warmup_steps: int  # optimizer steps; no default: each stage's YAML states its own
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        one_of("name", self.name, ("constant", "cosine", "linear"))
        non_negative("warmup_steps", self.warmup_steps)
        in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        warmup, name, floor = self.warmup_steps, self.name, self.min_lr_ratio
        total = max(1, total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if name == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
            return floor + (1 - floor) * shape

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
