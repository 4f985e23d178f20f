"""A KV cache that writes each new token into memory reserved once, for sampling.

transformers' `DynamicCache` grows every layer's keys and values by `torch.cat` at each decode step:
a step of a [B, H, L, D] cache copies all L earlier positions into a new tensor, so a response of R
tokens copies O(R^2) positions and allocates a fresh tensor per layer per token. Sampling knows its
final length (prompt width + max_new_tokens), so `preallocated_cache` reserves [B, H, L_max, D] per
layer on the first write and copies only the new positions; attention reads the view [:, :, :L] of
what is written so far, exactly the tensor `DynamicCache` would hold (the mask and the kernels see
the same shapes, so sampled tokens are identical; tested).

It is used only where every layer is plain full attention (sliding-window or linear-attention layers
keep transformers' own cache), and only for sampling: nothing backpropagates through it.
"""

from __future__ import annotations

import functools

from torch import Tensor


def preallocated_cache(config, capacity: int):
    """A cache holding up to `capacity` positions per layer, or transformers' `DynamicCache` when the
    model has other layer kinds than full attention, no config, or transformers predates cache layers."""
    from transformers import DynamicCache

    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:  # transformers < 4.55: no per-layer cache classes
        return DynamicCache()
    if config is None:
        return DynamicCache()
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not full_attention_only(text):
        return DynamicCache()
    return Cache(layer_class_to_replicate=functools.partial(_make_layer(DynamicLayer), capacity))


def full_attention_only(text_config) -> bool:
    """Whether every layer attends to every earlier position (no sliding window, no linear attention)."""
    kinds = getattr(text_config, "layer_types", None)
    if kinds:
        return set(kinds) == {"full_attention"}
    # older configs: a window is in force when set, unless the model says it is off (Qwen2's use_sliding_window)
    return not (getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True))


@functools.cache
def _make_layer(dynamic_layer: type):
    class PreallocatedLayer(dynamic_layer):
        """One layer's keys and values in [B, H, capacity, D] buffers; `keys`/`values` view the
        written part, so everything reading a `DynamicLayer` reads this one the same way."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device = key_states.device
            batch, heads, _, key_dim = key_states.shape
            self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_dim)
            self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
            self.length = 0
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:  # more than announced: grow (never on the sampling path)
                self._resize(max(end, 2 * self.capacity), self.key_buffer.shape[0])
            self.key_buffer[:, :, self.length:end].copy_(key_states)
            self.value_buffer[:, :, self.length:end].copy_(value_states)
            self.length = end
            return self._views()

        def _views(self) -> tuple[Tensor, Tensor]:
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]
            return self.keys, self.values

        def _resize(self, capacity: int, batch: int) -> None:
            keys = self.key_buffer.new_empty(batch, self.key_buffer.shape[1], capacity, self.key_buffer.shape[3])
            values = self.value_buffer.new_empty(batch, self.value_buffer.shape[1], capacity,
                                                 self.value_buffer.shape[3])
            keys[:, :, :self.length].copy_(self.key_buffer[:, :, :self.length])
            values[:, :, :self.length].copy_(self.value_buffer[:, :, :self.length])
            self.key_buffer, self.value_buffer, self.capacity = keys, values, capacity

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
                self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0 and self.is_initialized:
                self.length = max(0, self.length + tokens_to_remove)
                self._views()

        def reset(self) -> None:
            self.length = 0
            super().reset()

    return PreallocatedLayer
