"""How responses are sampled (training rollouts and held-out evaluation alike)."""

from __future__ import annotations

from dataclasses import dataclass

from lightrlhf.validation import non_negative, positive, require


@dataclass(frozen=True)
class GenerationSpec:
    """How responses are sampled: temperature (0 = greedy), top-k (0 = off), top-p, length."""

    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks); EOS is then an ordinary token
    merge_adapter: bool = True  # sample with the policy's LoRA folded into the weights (models/adapters.py::merged_adapter)

    def __post_init__(self) -> None:
        positive("max_new_tokens", self.max_new_tokens)
        non_negative("temperature", self.temperature)
        non_negative("top_k", self.top_k)
        require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out sampling: how many prompts, how many rows go into the logged sample table, the seed."""

    num_prompts: int = 512
    num_logged: int = 8
    batch_size: int = 128
    seed: int = 1234
    at_start: bool = True  # also evaluate before the first step: the "untrained" reference point

    def __post_init__(self) -> None:
        non_negative("num_prompts", self.num_prompts)
        non_negative("num_logged", self.num_logged)
        positive("batch_size", self.batch_size)
