"""LoRA adapters on one frozen base, addressed by role name.

peft's `set_adapter(name)` flips `requires_grad`: it makes `name` trainable and freezes the others,
frozen roles included (checked with peft 0.21). So nothing here asks `requires_grad` which weights
belong to a role. The weights of a role are found by *name* — peft stores adapter `a` of layer `l`
as `l.lora_A.a.weight`, `l.lora_B.a.weight`, and whole modules trained alongside as
`l.modules_to_save.a.*` — and optimizers and checkpoints are built from those names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                       "modules_to_save", "trainable_tokens_delta")


def adapter_parameter_names(model: nn.Module, adapter: str) -> list[str]:
    """Names (as in `model.named_parameters()`) of every parameter that belongs to `adapter`."""
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in _ADAPTER_CONTAINERS and parts[i + 1] == adapter:
                names.append(name)
                break
    return names


@contextlib.contextmanager
def active_adapter(peft_model, adapter: str | None) -> Iterator[None]:
    """Run the block with `adapter` active (None: every adapter off, i.e. the bare base).

    The trainable flags that `set_adapter` changes are restored afterwards by name, so a role that
    is frozen stays frozen whatever the order of passes. When `adapter` is already the active one
    (the policy, between the other roles' passes) nothing is switched: a switch walks every module.
    """
    if adapter is not None and peft_model.active_adapter == adapter and peft_model.has_active_enabled_adapter:
        yield
        return
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    try:
        if adapter is None:
            with peft_model.disable_adapter():
                yield
        else:
            previous = peft_model.active_adapter
            peft_model.set_adapter(adapter)
            try:
                yield
            finally:
                peft_model.set_adapter(previous)
    finally:
        for name, param in peft_model.named_parameters():
            param.requires_grad_(flags[name])


@contextlib.contextmanager
def merged_adapter(peft_model) -> Iterator[None]:
    """Run a no-grad block (sampling) with the active LoRA adapter folded into the adapted weights.

    Why: decoding feeds one token at a time, so each adapted linear layer costs three small matmuls
    (W x, A x, B(A x)) where one, (W + s B A) x, computes the same function; on the benchmark's 4M
    model this is ~10% of a rollout. The tokens are drawn from the same distribution up to float
    rounding; the log-probs a method learns from are computed afterwards by the unmerged model, so
    PPO's first ratio is still exactly 1.

    peft's `unmerge_adapter` subtracts s B A again, which leaves rounding error in the frozen base
    (the reference) that would grow rollout after rollout; so the adapted weights are copied before
    the merge and copied back afterwards, bit for bit. The copy is the size of the adapted weights.
    A model without an active LoRA adapter runs the block unchanged.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    # detail: merging ignores a disabled adapter (the reference role), so that case is checked here
    active = [layer for layer in layers
              if not layer.disable_adapters and any(name in layer.lora_A for name in layer.active_adapters)]
    if not active or not hasattr(peft_model, "merge_adapter") or any(layer.merged for layer in layers) \
            or _adapts_a_tied_weight(peft_model, active):
        yield
        return
    originals = [(p, p.detach().clone()) for layer in active for p in layer.get_base_layer().parameters(recurse=False)]
    peft_model.merge_adapter()
    try:
        yield
    finally:
        peft_model.unmerge_adapter()
        for param, original in originals:
            param.data.copy_(original)


def _adapts_a_tied_weight(peft_model, layers) -> bool:
    """An adapted output head whose weight is the input embedding's (tied, as in gpt2 or Qwen2.5):
    folding the head's LoRA into it would change the embedding that feeds every token too."""
    embeddings = peft_model.get_input_embeddings() if hasattr(peft_model, "get_input_embeddings") else None
    tied = getattr(embeddings, "weight", None)
    return tied is not None and any(layer.get_base_layer().weight is tied for layer in layers)
