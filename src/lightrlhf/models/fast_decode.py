"""One decode step of a Llama-family model written with plain torch ops, for sampling.

Why: a rollout feeds one token per step, and transformers' forward spends a good part of each step
on per-token Python and dispatch rather than arithmetic: the causal mask built from the 2-D mask,
cache bookkeeping, output dataclasses and kwargs plumbing, the rotary module, and peft's LoRA
wrappers (which branch on their state at every call even with the adapter folded in). On the
benchmark workload (4.2M-parameter Llama, 16 rows; `python -m lightrlhf.bench.decode`, idle
machine) a step took 9.4 ms with 1 thread and 5.5 ms with 2, where its 29 matmuls and 4 attention
calls, timed alone at the same shapes, take 3.9 and 2.5 ms. `LeanDecoder.step` runs the same
arithmetic as `LlamaDecoderLayer` with nothing else: it reads the modules' own weights, writes K/V
into the buffers the preallocated cache reserved (models/kv_cache.py), keeps an additive
attention-mask row updated in place, and calls `scaled_dot_product_attention`; float32 weights are
packed once for MKL's small-batch sgemm (see `_Linear`). A step of the sampling loop then took 4.0
to 6.3 ms with 1 thread and 3.8 to 4.2 ms with 2 (1.35x to 1.43x the tokens/s of the whole sample,
prompt forward included; bench/decode.py has the runs). What is left above the matmuls and
attention is mostly the token draw (rl/next_token.py) and the loop's own bookkeeping, so no eager
step can be 3x faster on this machine: the arithmetic alone is 40 to 45% of transformers' step.
`torch.compile` of the step (inductor, dynamic shapes) compiled for 25 s and then ran slower than
eager (8.9 against 3.6 ms a step), so it is not used.

The step is the same function as transformers' (tested step by step against its logits): RMSNorm
as `LlamaRMSNorm` computes it; RoPE from a cos/sin table the model's own rotary module computes once
for positions 0..capacity-1 (so linear and llama3 frequency scaling are honoured, and each entry is
the value the module returns for that position); rotate_half(q) * sin written as roll(q) * sin with
the first half of sin negated (the same products, bit for bit); GQA via sdpa's `enable_gqa`; a
LoRA layer that is not merged adds B(A x) * s exactly as peft's `Linear.forward` does.

What qualifies (`unsupported_reason` says why not): a llama, mistral or qwen2 causal LM with full
attention in every layer (no sliding window), SiLU MLPs, rope_type default, linear or llama3, and
exactly the submodules of `LlamaDecoderLayer` (a q/k-norm, as in qwen3, is not there). A projection
the step does not recognise (another peft tuner, DoRA, active LoRA dropout) is called as a module:
slower, still exact. Anything else decodes with transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightrlhf.models.kv_cache import full_attention_only

FAMILIES = frozenset({"llama", "mistral", "qwen2"})
# rope types whose cos/sin for a position do not depend on the sequence length seen so far
STATIC_ROPE = frozenset({"default", "linear", "llama3"})
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` (a transformers causal LM, maybe inside a peft model) cannot use the lean step; None if it can."""
    if hasattr(model, "peft_config") and any(c.is_prompt_learning for c in model.peft_config.values()):
        return "a prompt-learning peft adapter changes the inputs"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        return "no config"
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model_type {family!r} is not one of {sorted(FAMILIES)}"
    if not full_attention_only(config):
        return "some layers use sliding-window attention"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not silu"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope_type {rope!r} is not one of {sorted(STATIC_ROPE)}"
    if base.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout is active (training mode)"
    body = getattr(base, "model", None)
    if not isinstance(getattr(base, "lm_head", None), nn.Module) or not all(
            hasattr(body, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(base).__name__} is not laid out as LlamaForCausalLM"
    for layer in body.layers[:config.num_hidden_layers]:
        if set(_children(layer)) != _LAYER_PARTS or set(_children(layer.self_attn)) != _ATTENTION_PARTS \
                or set(_children(layer.mlp)) != _MLP_PARTS:
            return f"{type(layer).__name__} has other parts than LlamaDecoderLayer"
    return None


def _children(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_children()]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32 as LlamaRMSNorm computes it (Zhang & Sennrich 2019)."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        # detail: torch's fused kernel, one op instead of six; in float32 it returns LlamaRMSNorm's bits (tested)
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class _Norm:
    __slots__ = ("weight", "eps", "module")

    def __init__(self, module: nn.Module):
        plain = type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
        self.weight, self.eps = (module.weight, module.variance_epsilon) if plain else (None, None)
        self.module = None if plain else module

    def __call__(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps) if self.module is None else self.module(x)


class _Linear:
    """A projection read from its module: W x + b, plus s * B(A x) for each active, unmerged LoRA adapter.

    detail: with `rows` set, W is packed once for MKL's sgemm at that many rows (float32 on CPU).
    An unpacked `F.linear` with 16 rows repacks W at every call; on the benchmark's shapes packing
    cut the step's 29 matmuls from 2.2 to 1.5 ms (1 thread) for a one-off copy of the weights that
    is repacked at each `sample` (the folded-in adapter changes them), with bit-identical outputs."""

    __slots__ = ("weight", "bias", "loras", "module", "packed", "rows")

    def __init__(self, module: nn.Module, rows: int | None = None):
        self.module, self.loras, self.packed, self.rows = None, [], None, rows
        base, loras = _resolve(module)
        if base is None:
            self.module = module
            return
        self.weight, self.bias, self.loras = base.weight, base.bias, loras
        if rows is not None and _mkl_packing() and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)

    def __call__(self, x: Tensor) -> Tensor:
        if self.module is not None:
            return self.module(x)
        if self.packed is not None:
            out = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        else:
            out = F.linear(x, self.weight, self.bias)
        for lora_a, lora_b, scale in self.loras:  # peft: result + lora_B(lora_A(dropout(x))) * scaling
            out = out + F.linear(F.linear(x, lora_a.weight, lora_a.bias), lora_b.weight, lora_b.bias) * scale
        return out


def _mkl_packing() -> bool:
    """Whether this torch has MKL's packed sgemm (the ops inductor uses for CPU linear layers)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") \
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


def _resolve(module: nn.Module) -> tuple[nn.Linear | None, list]:
    """(the nn.Linear whose weight holds W, [(lora_A, lora_B, scaling)] to add), or (None, []) when only
    calling the module computes what it computes. Read once, inside the role context sampling uses."""
    if type(module) is nn.Linear:
        return module, []
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return None, []
    if not isinstance(module, LoraLinear) or type(module.get_base_layer()) is not nn.Linear:
        return None, []
    base = module.get_base_layer()
    if module.disable_adapters:
        # peft unmerges a merged layer when its adapters are disabled: the module call does that
        return (None, []) if module.merged else (base, [])
    if module.merged:  # W + s B A is in the base weight already
        return base, []
    loras = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        dropping = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
        if name in module.lora_variant or dropping or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear \
                or lora_a.weight.dtype != base.weight.dtype:
            return None, []
        loras.append((lora_a, lora_b, module.scaling[name]))
    return base, loras


class _Layer:
    __slots__ = ("input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down", "heads", "kv_heads",
                 "head_dim", "scaling", "keys", "values")

    def __init__(self, layer: nn.Module, keys: Tensor, values: Tensor):
        attention, mlp, rows = layer.self_attn, layer.mlp, keys.shape[0]
        self.input_norm, self.post_norm = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        self.q, self.k, self.v, self.o = (_Linear(p, rows) for p in (attention.q_proj, attention.k_proj,
                                                                      attention.v_proj, attention.o_proj))
        self.gate, self.up, self.down = (_Linear(p, rows) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.kv_heads = keys.shape[1]
        self.heads = self.kv_heads * attention.num_key_value_groups
        self.keys, self.values = keys, values


class LeanDecoder:
    """Decodes one token per row per `step`, continuing a prefill that transformers' forward wrote
    into a preallocated cache. Build it with `lean_decoder`, inside the context sampling runs in."""

    def __init__(self, base: nn.Module, cache, attended: Tensor, capacity: int):
        body, config = base.model, base.config
        layers = body.layers[:config.num_hidden_layers]
        self.layers = [_Layer(layer, cache_layer.key_buffer, cache_layer.value_buffer)
                       for layer, cache_layer in zip(layers, cache.layers)]
        # a plain embedding is a lookup; a wrapped one (peft's embedding LoRA, trainable tokens) is called
        lookup = type(body.embed_tokens) is nn.Embedding and body.embed_tokens.max_norm is None
        self.embedding = body.embed_tokens.weight if lookup else None
        self.embed = body.embed_tokens
        self.norm, self.head = _Norm(body.norm), _Linear(base.lm_head, attended.shape[0])
        parts = [p for layer in self.layers for p in (layer.input_norm, layer.post_norm, layer.q, layer.k, layer.v,
                                                       layer.o, layer.gate, layer.up, layer.down)]
        # whether every weight was read at build time: then a step computes the role it was built in
        # whatever adapter is active, and needs no role switch around it (a switch walks every module)
        self.self_contained = self.embedding is not None and all(p.module is None for p in [*parts, self.norm, self.head])
        self.length = cache.layers[0].length
        keys = self.layers[0].keys
        dtype, device = keys.dtype, keys.device
        # detail: the rotary module's own output for positions 0..capacity-1, so scaled rope types come
        # out as transformers computes them; positions count from each row's first real token (< capacity)
        cos, sin = body.rotary_emb(keys, torch.arange(capacity, device=device)[None])
        half = cos.shape[-1] // 2
        self.cos = cos[0]
        # rotate_half(q) * sin == roll(q, half) * [-sin_1, sin_2]: one roll instead of two slices, a neg and a cat
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.half = half
        # additive mask: 0 where a position is attended, the dtype's lowest value where it is not (not -inf:
        # a row with nothing attended, an empty prompt, then averages instead of giving NaN)
        self.bias = torch.full((attended.shape[0], 1, 1, capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.bias[:, 0, 0, :self.length].masked_fill_(attended.bool(), 0.0)

    def step(self, tokens: Tensor, attended: Tensor, positions: Tensor) -> Tensor:
        """Logits [B, V] (float32) of the position after `tokens` [B], fed at `positions` [B]; `attended`
        [B] is 0 for a row whose token later positions must not see (a finished row's pad)."""
        at = self.length
        self.bias[:, 0, 0, at].masked_fill_(attended.bool(), 0.0)
        bias = self.bias.narrow(-1, 0, at + 1)
        batch = tokens.shape[0]
        cos, sin = self.cos[positions].view(batch, 1, 1, -1), self.sin[positions].view(batch, 1, 1, -1)
        x = self.embed(tokens) if self.embedding is None else F.embedding(tokens, self.embedding)
        for layer in self.layers:
            h = layer.input_norm(x)
            q = layer.q(h).view(batch, layer.heads, 1, layer.head_dim)
            k = layer.k(h).view(batch, layer.kv_heads, 1, layer.head_dim)
            v = layer.v(h).view(batch, layer.kv_heads, 1, layer.head_dim)
            q = q * cos + q.roll(self.half, -1) * sin
            torch.add(k * cos, k.roll(self.half, -1) * sin, out=layer.keys.narrow(2, at, 1))  # rotated into the cache
            layer.values.narrow(2, at, 1).copy_(v)
            attention = F.scaled_dot_product_attention(
                q, layer.keys.narrow(2, 0, at + 1), layer.values.narrow(2, 0, at + 1), attn_mask=bias,
                scale=layer.scaling, enable_gqa=layer.heads != layer.kv_heads)
            x = x + layer.o(attention.reshape(batch, layer.heads * layer.head_dim))
            h = layer.post_norm(x)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        self.length = at + 1
        return self.head(self.norm(x)).float()


def lean_decoder(model: nn.Module, cache, attended: Tensor, capacity: int) -> LeanDecoder | None:
    """A `LeanDecoder` continuing what the prefill wrote into `cache` (`attended` [B, width]: the prompt
    mask, rows as in the cache), or None when the model does not qualify or the cache is not the
    preallocated one; then transformers' forward keeps decoding."""
    if unsupported_reason(model) is not None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(cache, "layers", None)
    if not layers or len(layers) != base.config.num_hidden_layers \
            or not all(hasattr(layer, "key_buffer") and layer.length == attended.shape[1] for layer in layers) \
            or layers[0].key_buffer.shape[0] != attended.shape[0] or layers[0].key_buffer.shape[2] < capacity:
        return None
    return LeanDecoder(base, cache, attended, capacity)
