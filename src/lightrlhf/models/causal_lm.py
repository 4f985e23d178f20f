"""A causal language model ready to train: frozen base, one LoRA adapter (or full weights), tokenizer."""

from __future__ import annotations

from torch import Tensor, nn

from lightrlhf.models.adapters import adapter_parameter_names
from lightrlhf.models.loading import BaseIdentity, load_base_model, load_tokenizer
from lightrlhf.models.spec import ModelSpec

ADAPTER = "default"


class CausalLM(nn.Module):
    """`module` is a peft model with adapter "default" when `spec.lora` is set, else the bare model.

    What trains is decided here once, by name: the adapter's weights, or every weight of a full
    fine-tune. Checkpoints and optimizers use `trainable_parameter_names()`.
    """

    def __init__(self, module: nn.Module, tokenizer, spec: ModelSpec, base: BaseIdentity):
        super().__init__()
        self.module, self.tokenizer, self.spec, self.base = module, tokenizer, spec, base
        if spec.lora is None:
            module.requires_grad_(True)
            self._trainable = [n for n, _ in module.named_parameters()]
        else:
            self._trainable = adapter_parameter_names(module, ADAPTER)

    @property
    def is_adapter(self) -> bool:
        return self.spec.lora is not None

    def trainable_parameter_names(self) -> list[str]:
        """Names relative to `self` (prefixed with "module.")."""
        return [f"module.{n}" for n in self._trainable]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, **kwargs) -> Tensor:
        return self.module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits

    def merged_model(self) -> nn.Module:
        """A plain transformers model with the adapter folded in (a copy; training state untouched)."""
        import copy

        if not self.is_adapter:
            return self.module
        return copy.deepcopy(self.module).merge_and_unload()


def load_causal_lm(spec: ModelSpec, tokenizer=None) -> CausalLM:
    """Config target for the SFT stage: base + fresh LoRA adapter (or full weights) + tokenizer."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    base, identity = load_base_model(spec)
    if spec.lora is None:
        return CausalLM(base, tokenizer, spec, identity)
    from peft import get_peft_model

    module = get_peft_model(base, spec.lora.to_peft("CAUSAL_LM"), adapter_name=ADAPTER)
    module.base_model.model.config.use_cache = False
    _check_trainable(module, spec)
    return CausalLM(module, tokenizer, spec, identity)


def _check_trainable(module: nn.Module, spec: ModelSpec) -> None:
    from lightrlhf.errors import ConfigError

    if not adapter_parameter_names(module, ADAPTER):
        raise ConfigError("model.lora.target_modules",
                          f"matched no module of {spec.name_or_path} ({spec.lora.target_modules!r})")
