"""What a model config says: which weights, which dtype, which LoRA.

`conf/model/*.yaml` are instances of `ModelSpec`; its checks run when the config is built, so a
wrong value (`model.lora.r=0`, an unknown dtype) is reported with its key before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lightrlhf.validation import in_range, one_of, positive, require

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA (Hu et al. 2021): W' = W + (alpha / r) * B A with A: r x in, B: out x r, B = 0 at start.

    `target_modules="all-linear"` adapts every linear layer but the output head (peft's rule);
    `modules_to_save` trains whole modules alongside (e.g. `embed_tokens`, `lm_head`) and stores them
    in the adapter file. `use_rslora` scales by alpha / sqrt(r) (Kalajdzievski 2023), which keeps the
    update size stable when sweeping r.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        positive("r", self.r)
        positive("alpha", self.alpha)
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        require(bool(self.target_modules), "target_modules", "must name at least one module")

    def to_peft(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          modules_to_save=list(self.modules_to_save) or None, use_rslora=self.use_rslora,
                          task_type=task_type, bias="none")


@dataclass(frozen=True)
class ModelSpec:
    """A base model to load: a local directory, a hub id, or a lightrlhf export directory.

    An export directory works as a base too: an SFT adapter export is merged into *its* base on load,
    so `model.name_or_path=<sft export>` gives the SFT model, with a base identity that names both.
    """

    name_or_path: str
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    gradient_checkpointing: bool = False
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False  # never run code from a model repository unless asked to
    max_length: int | None = None  # context length to use; None = the tokenizer's model_max_length

    def __post_init__(self) -> None:
        require(bool(self.name_or_path), "name_or_path", "must not be empty")
        one_of("dtype", self.dtype, DTYPES)
        if self.max_length is not None:
            positive("max_length", self.max_length)
            in_range("max_length", self.max_length, 1, 1 << 20)
