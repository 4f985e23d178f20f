"""The lean decode step (models/fast_decode.py) against transformers' forward, step by step.

Two steppers from models/generation.py run side by side on the same inputs, one decoding with the
lean step and one with transformers' forward; their logits must agree at every step, for tiny random
Llama, Qwen2 (q/k/v biases), GQA and scaled-RoPE configs, left-padded prompts of different lengths,
rows that finish midway, and the demo model with its LoRA adapter folded in, applied unmerged, or
switched off. Then `sample` with a fixed seed must draw the same tokens either way, and models the
step does not cover must fall back to transformers' forward and still sample.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lightrlhf.models.actor_critic import PolicySpec, load_actor_critic
from lightrlhf.models.adapters import merged_adapter
from lightrlhf.models.fast_decode import _mkl_packing, unsupported_reason
from lightrlhf.models.generation import _Stepper, left_pad, positions_from_mask, sample

PAD, EOS = 0, 2
# float32 defaults of torch.testing.assert_close: the two paths run the same ops in the same order,
# except that sdpa gets an additive mask instead of a boolean one
TOLERANCE = dict(rtol=1.3e-6, atol=1e-5)
SMALL = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
             attn_implementation="sdpa")


def _model(cls, config_cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(config_cls(**{**SMALL, **overrides})).eval()


MODELS = {
    "llama": lambda: _model(LlamaForCausalLM, LlamaConfig, num_key_value_heads=4),
    "llama_gqa_biases": lambda: _model(LlamaForCausalLM, LlamaConfig, num_key_value_heads=2, attention_bias=True,
                                       mlp_bias=True),
    "llama3_rope": lambda: _model(LlamaForCausalLM, LlamaConfig, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8)),
    "linear_rope_tied": lambda: _model(LlamaForCausalLM, LlamaConfig, num_key_value_heads=4, tie_word_embeddings=True,
                                       rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0)),
    "qwen2": lambda: _model(Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2),
    "qwen2_bfloat16": lambda: _model(Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2).to(torch.bfloat16),
    "mistral_no_window": lambda: _model(MistralForCausalLM, MistralConfig, num_key_value_heads=2, sliding_window=None),
}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]


def _paired_logits(model, prompts=PROMPTS, steps: int = 8, repeats: int = 1, finish_row: int | None = 1,
                   context=contextlib.nullcontext):
    """[(lean logits, transformers logits)] per position: the prefill, then `steps` decode steps fed the
    transformers path's argmax; row `finish_row` finishes after two steps (its later tokens are masked pads)."""
    ids, mask = left_pad(prompts, PAD)
    width, capacity = ids.shape[1], ids.shape[1] + steps + 1
    lean, plain = _Stepper(model, context, capacity, fast=True), _Stepper(model, context, capacity, fast=False)
    positions = positions_from_mask(mask)
    pairs = [(lean.prefill(ids, mask, positions, repeats), plain.prefill(ids, mask, positions, repeats))]
    assert lean.lean is not None and plain.lean is None
    rows = ids.shape[0] * repeats
    full_mask = torch.zeros(rows, capacity, dtype=torch.long)
    full_mask[:, :width] = mask.repeat_interleave(repeats, 0)
    step_positions = positions[:, -1:].repeat_interleave(repeats, 0)
    for step in range(steps):
        tokens = pairs[-1][1].argmax(-1)
        alive = torch.ones(rows, dtype=torch.long)
        if finish_row is not None and step >= 2:
            alive[finish_row] = 0
            tokens[finish_row] = PAD
        full_mask[:, width + step] = alive
        step_positions = step_positions + 1
        pairs.append((lean.decode(tokens, full_mask, width + step + 1, step_positions),
                      plain.decode(tokens, full_mask, width + step + 1, step_positions)))
    return pairs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lean_step_logits_equal_transformers_at_every_step(name):
    model = MODELS[name]()
    assert unsupported_reason(model) is None
    with torch.no_grad():
        pairs = _paired_logits(model)
    for step, (lean, plain) in enumerate(pairs):
        torch.testing.assert_close(lean, plain, **TOLERANCE, msg=lambda m, step=step: f"step {step}: {m}")
    assert len(pairs) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_weights_are_packed_for_the_decode_batch(dtype):
    """MKL-packed weights for float32 on CPU (the logits above are compared with them in use); other
    dtypes multiply by the module's own weights."""
    model = MODELS["llama"]().to(dtype)
    stepper = _Stepper(model, contextlib.nullcontext, 16)
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        stepper.prefill(ids, mask, positions_from_mask(mask), 2)
    linears = [stepper.lean.head] + [getattr(layer, name) for layer in stepper.lean.layers
                                     for name in ("q", "k", "v", "o", "gate", "up", "down")]
    packed = dtype == torch.float32 and _mkl_packing()
    assert all((linear.packed is not None) == packed for linear in linears)
    assert all(linear.rows == 2 * len(PROMPTS) for linear in linears)


def test_grouped_prompts_continue_each_row_from_its_own_prompt():
    with torch.no_grad():
        pairs = _paired_logits(MODELS["qwen2"](), repeats=3, finish_row=4)
    for lean, plain in pairs:
        assert lean.shape[0] == 12
        torch.testing.assert_close(lean, plain, **TOLERANCE)


def test_an_empty_prompt_row_gives_finite_logits():
    """A row with no real token attends to nothing at its first position: the additive mask uses the
    dtype's lowest value, not -inf, so the row's logits stay finite (sampling would reject NaN)."""
    with torch.no_grad():
        pairs = _paired_logits(MODELS["llama"](), prompts=[[5, 6], []], steps=3, finish_row=None)
    for lean, plain in pairs[1:]:  # after one generated token the row attends to that token
        torch.testing.assert_close(lean, plain, **TOLERANCE)
    assert all(torch.isfinite(lean).all() for lean, _ in pairs)


# --- the demo model with its LoRA adapter ---------------------------------------------------------


def _demo_actor(tiny_spec, tiny_tokenizer, adapt_head: bool = False):
    """The demo policy (LoRA on every linear layer, optionally the head) with B drawn away from zero."""
    torch.manual_seed(0)
    actor = load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(None, adapt_head=adapt_head), reward=None,
                              critic=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in actor.module.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3, generator=generator)
    return actor.eval()


def _demo_prompts(tokenizer):
    texts = ["explain river rain :", "list flame ash and more words :", "briefly tree :"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("role", ["merged", "unmerged", "reference"])
def test_demo_model_with_its_adapter_merged_unmerged_or_off(tiny_spec, tiny_tokenizer, role):
    actor = _demo_actor(tiny_spec, tiny_tokenizer)
    context = {"merged": lambda: _merged(actor), "unmerged": actor.policy_context,
               "reference": actor.reference_context}[role]
    with torch.no_grad(), context():
        pairs = _paired_logits(actor.module, _demo_prompts(tiny_tokenizer), steps=10)
    for lean, plain in pairs:
        torch.testing.assert_close(lean, plain, **TOLERANCE)
    with torch.no_grad(), actor.reference_context():
        base = _paired_logits(actor.module, _demo_prompts(tiny_tokenizer), steps=1)[0][1]
    assert (role == "reference") == torch.allclose(pairs[0][1], base, atol=1e-4)  # the adapter matters


@contextlib.contextmanager
def _merged(actor):
    with actor.policy_context(), merged_adapter(actor.module):
        yield


def test_an_adapted_head_tied_or_not(tiny_spec, tiny_tokenizer):
    """The head's LoRA is folded in when the head has its own weight, and applied unmerged when it is
    tied to the embedding (merged_adapter then folds nothing)."""
    from peft import LoraConfig, get_peft_model

    from lightrlhf.models.actor_critic import with_output_head

    actor = _demo_actor(tiny_spec, tiny_tokenizer, adapt_head=True)
    with torch.no_grad(), _merged(actor):
        assert actor.module.base_model.model.lm_head.merged
        pairs = _paired_logits(actor.module, _demo_prompts(tiny_tokenizer))
    tied = MODELS["linear_rope_tied"]()
    tied = get_peft_model(tied, with_output_head(LoraConfig(r=4, target_modules="all-linear"), tied))
    with torch.no_grad():
        for name, param in tied.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
        with merged_adapter(tied):
            assert not tied.base_model.model.lm_head.merged
            pairs += _paired_logits(tied)
    for lean, plain in pairs:
        torch.testing.assert_close(lean, plain, **TOLERANCE)


# --- sampling ------------------------------------------------------------------------------------


def _sample_both(model, prompts, **kwargs):
    ids, mask = left_pad(prompts, PAD)
    kwargs = {"max_new_tokens": 12, "eos_token_id": EOS, "pad_token_id": PAD, "temperature": 1.0, **kwargs}
    seed = kwargs.pop("seed", 0)
    return [sample(model, ids, mask, generator=torch.Generator().manual_seed(seed), fast=fast, **kwargs)
            for fast in (True, False)]


def _assert_same(fast, plain):
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended_with_eos"):
        assert torch.equal(getattr(fast, field), getattr(plain, field)), field


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama3_rope"])
def test_seeded_samples_equal_with_groups_and_eos(name):
    model = MODELS[name]()
    ended = 0
    for seed in range(3):
        fast, plain = _sample_both(model, PROMPTS, repeats=3, seed=seed, max_new_tokens=30)
        _assert_same(fast, plain)
        assert fast.response_ids.shape[0] == 12
        ended += int(fast.ended_with_eos.sum())
        for ids, mask in zip(fast.response_ids, fast.response_mask):
            n = int(mask.sum())
            assert ids[n:].tolist() == [PAD] * (len(ids) - n)  # finished rows padded as before
    assert ended > 0  # EOS stopping was exercised


def test_demo_rollout_samples_equal(tiny_spec, tiny_tokenizer):
    actor = _demo_actor(tiny_spec, tiny_tokenizer)
    tok = tiny_tokenizer
    prompts = _demo_prompts(tok)
    kwargs = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=20, repeats=2)
    with torch.no_grad(), _merged(actor):
        fast, plain = _sample_both(actor.module, prompts, **kwargs)
    _assert_same(fast, plain)
    # exploration: every token drawn from the policy or the reference
    mixed = _sample_both(actor.module, prompts, model_context=actor.policy_context,
                         mix_model_context=actor.reference_context, mix_epsilon=0.5, **kwargs)
    _assert_same(*mixed)

    def role_switches(fast: bool) -> int:
        entered = []

        def counted(context):
            @contextlib.contextmanager
            def wrapper():
                entered.append(1)
                with context():
                    yield
            return wrapper

        sample(actor.module, *left_pad(prompts, tok.pad_token_id), model_context=counted(actor.policy_context),
               mix_model_context=counted(actor.reference_context), mix_epsilon=0.5, fast=fast,
               generator=torch.Generator().manual_seed(0), **kwargs)
        return len(entered)

    # a lean stepper reads its role's weights once: its role is entered for the prompt and the build only,
    # where transformers' forward enters it again at every token
    assert role_switches(fast=True) == 4
    assert role_switches(fast=False) > 4 + 2 * 5


def test_the_lean_step_replaces_the_per_token_forward():
    model = MODELS["llama"]()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    _sample_both(model, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    assert len(calls) == 1 + 6  # fast: the prefill only; transformers: the prefill and 5 decode steps


UNSUPPORTED = {
    "sliding window": lambda: _model(MistralForCausalLM, MistralConfig, num_key_value_heads=2, sliding_window=4),
    "qk-norm": lambda: _model(Qwen3ForCausalLM, Qwen3Config, num_key_value_heads=2, head_dim=8),
    "dynamic rope": lambda: _model(LlamaForCausalLM, LlamaConfig, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "gpt2": lambda: _gpt2(),
}


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=EOS)).eval()


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_other_models_fall_back_and_still_sample(name):
    model = UNSUPPORTED[name]()
    assert unsupported_reason(model) is not None
    fast, plain = _sample_both(model, PROMPTS, repeats=2)
    _assert_same(fast, plain)
    stepper = _Stepper(model, contextlib.nullcontext, 16)
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        stepper.prefill(ids, mask, positions_from_mask(mask), 1)
    assert stepper.lean is None


def test_reasons_name_what_is_unsupported():
    reasons = {name: unsupported_reason(make()) for name, make in UNSUPPORTED.items()}
    assert "sliding-window" in reasons["sliding window"]
    assert "qwen3" in reasons["qk-norm"]
    assert "dynamic" in reasons["dynamic rope"]
    assert "gpt2" in reasons["gpt2"]
