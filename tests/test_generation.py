"""Sampling with a KV cache: equal to the uncached argmax loop, left padding, masks after EOS, seeds, mixing.

A scripted stand-in model pins down the bookkeeping (masks, pads, positions) exactly; the tiny demo
model, with its LoRA B weights perturbed so that the adapter changes the output, checks the cache,
padding and the reference-model mixture against plain forward passes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightrlhf.models.causal_lm import load_causal_lm
from lightrlhf.models.generation import Generation, decode_responses, left_pad, positions_from_mask, sample

EOS, PAD = 2, 0
PROMPTS = ["explain river rain :", "list flame ash :", "briefly tree moss :", "describe song drum :"]


class Scripted(torch.nn.Module):
    """Emits `script[row][step]` at each call (logits one-hot), recording what it was fed."""

    def __init__(self, script: list[list[int]], vocab: int = 10):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        step = len(self.calls)
        self.calls.append(SimpleNamespace(ids=input_ids.tolist(), mask=attention_mask.tolist(),
                                          positions=position_ids.tolist()))
        logits = torch.zeros(len(self.script), 1, self.vocab)
        for row, tokens in enumerate(self.script):
            logits[row, 0, tokens[step]] = 1.0
        return SimpleNamespace(logits=logits)


def _sample(model, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 4, "eos_token_id": EOS, "pad_token_id": PAD, "temperature": 0.0, **kwargs}
    return sample(model, ids, mask, **kwargs)


# --- hand-made inputs ---------------------------------------------------------------------------


def test_left_pad_by_hand():
    ids, mask = left_pad([[5, 6], [7, 8, 9, 4], [], [3]], pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 4], [0, 0, 0, 0], [0, 0, 0, 3]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_positions_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    # a hole left by a finished row (mask 0 after real tokens) does not advance the count
    assert positions_from_mask(torch.tensor([[1, 1, 0, 1]])).tolist() == [[0, 1, 1, 2]]


# --- bookkeeping, with a scripted model ---------------------------------------------------------


def test_masks_pads_and_eos_flags_by_hand():
    ids, mask = left_pad([[5, 6], [7, 8, 9]], PAD)
    model = Scripted([[5, EOS, 7, 7], [5, 6, 7, 8]])
    gen = _sample(model, ids, mask)
    assert gen.response_ids.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8]]  # row 0: pad after its EOS
    assert gen.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # up to and including EOS
    assert gen.ended_with_eos.tolist() == [True, False]
    assert gen.sequences.tolist() == [[0, 5, 6, 5, EOS, PAD, PAD], [7, 8, 9, 5, 6, 7, 8]]
    assert gen.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]


def test_model_is_fed_left_padded_positions_and_a_growing_mask():
    ids, mask = left_pad([[5, 6], [7, 8, 9]], PAD)
    model = Scripted([[5, EOS, 7, 7], [5, 6, 7, 8]])
    _sample(model, ids, mask)
    first, second, third, fourth = model.calls
    assert first.ids == [[0, 5, 6], [7, 8, 9]] and first.positions == [[0, 0, 1], [0, 1, 2]]
    assert first.mask == [[0, 1, 1], [1, 1, 1]]
    assert second.ids == [[5], [5]] and second.positions == [[2], [3]]
    assert second.mask == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert third.ids == [[EOS], [6]] and third.positions == [[3], [4]]
    # row 0 finished: the pad fed in its place is masked out
    assert fourth.ids == [[PAD], [7]] and fourth.mask == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def test_max_new_tokens_and_early_stop():
    ids, mask = left_pad([[5], [6]], PAD)
    gen = _sample(Scripted([[4] * 8, [5] * 8]), ids, mask, max_new_tokens=3)
    assert gen.response_ids.tolist() == [[4, 4, 4], [5, 5, 5]]
    assert gen.ended_with_eos.tolist() == [False, False]
    # once every row has its EOS the loop stops, before max_new_tokens
    model = Scripted([[EOS] + [4] * 7, [5, EOS] + [4] * 6])
    gen = _sample(model, ids, mask, max_new_tokens=8)
    assert gen.response_ids.tolist() == [[EOS, PAD], [5, EOS]]
    assert gen.response_mask.tolist() == [[1, 0], [1, 1]]
    assert gen.ended_with_eos.tolist() == [True, True]
    assert len(model.calls) == 2


def test_stop_at_eos_false_keeps_generating():
    ids, mask = left_pad([[5]], PAD)
    gen = _sample(Scripted([[EOS, 4, 5]]), ids, mask, max_new_tokens=3, stop_at_eos=False)
    assert gen.response_ids.tolist() == [[EOS, 4, 5]] and gen.response_mask.tolist() == [[1, 1, 1]]
    assert gen.ended_with_eos.tolist() == [True]


def test_decode_responses_keeps_only_the_masked_response(tiny_tokenizer):
    river, full_stop = tiny_tokenizer.convert_tokens_to_ids(["river", "."])
    gen = Generation(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                     response_ids=torch.tensor([[river, full_stop, EOS, PAD], [river, river, river, river]]),
                     response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
                     ended_with_eos=torch.tensor([True, False]))
    assert decode_responses(tiny_tokenizer, gen) == ["river .", "river river"]


# --- the tiny model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_spec):
    """The peft model and tokenizer, with LoRA B moved off zero so that the adapter matters.

    LoRA A is drawn from the global RNG when the adapter is made; both are redrawn from a fixed
    generator so that the model, and so every greedy output below, is the same in every run.
    """
    lm = load_causal_lm(tiny_spec)
    model = lm.module.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        perturbed = [p.normal_(0.0, 0.5, generator=generator) for n, p in model.named_parameters()
                     if "lora_A" in n or "lora_B" in n]
    assert len(perturbed) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks
    return model, lm.tokenizer


def _encode(tokenizer, prompts):
    return left_pad([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id)


def _greedy(model, tokenizer, prompts, max_new_tokens=12, **kwargs) -> Generation:
    ids, mask = _encode(tokenizer, prompts)
    return sample(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, temperature=0.0, **kwargs)


@torch.no_grad()
def _argmax_without_cache(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> list[int]:
    sequence = tokenizer(prompt)["input_ids"]
    out = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1].argmax())
        out.append(token)
        sequence.append(token)
        if token == tokenizer.eos_token_id:
            break
    return out


def _masked(gen: Generation, row: int) -> list[int]:
    return gen.response_ids[row][gen.response_mask[row].bool()].tolist()


def test_greedy_with_cache_equals_argmax_of_full_forwards(policy):
    model, tokenizer = policy
    lengths = []
    for prompt in PROMPTS:
        gen = _greedy(model, tokenizer, [prompt])
        expected = _argmax_without_cache(model, tokenizer, prompt)
        lengths.append(len(expected))
        assert gen.response_ids[0].tolist() == expected  # one row: no padding after EOS
        assert gen.response_mask[0].tolist() == [1] * len(expected)
        assert bool(gen.ended_with_eos[0]) == (expected[-1] == tokenizer.eos_token_id)
    assert max(lengths) >= 5, lengths  # several cached steps were compared


def test_left_padded_batch_gives_each_prompt_its_own_greedy_tokens(policy):
    model, tokenizer = policy
    longer = "explain river rain : the river and"
    batch = [PROMPTS[1], longer, PROMPTS[2]]
    ids, mask = _encode(tokenizer, batch)
    assert mask[0].tolist() == [0] * 3 + [1] * 5 and mask[1].all()  # the short prompts are left-padded
    gen = _greedy(model, tokenizer, batch)
    for row, prompt in enumerate(batch):
        alone = _greedy(model, tokenizer, [prompt])
        assert _masked(gen, row) == _masked(alone, 0) == _argmax_without_cache(model, tokenizer, prompt)
        assert bool(gen.ended_with_eos[row]) == bool(alone.ended_with_eos[0])
    assert gen.response_mask[0].sum() == 12  # the padded row runs for every step


def test_response_mask_and_pads_after_eos_on_the_real_model(policy):
    model, tokenizer = policy
    gen = _greedy(model, tokenizer, PROMPTS, max_new_tokens=20)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    lengths = []
    for row in range(len(PROMPTS)):
        ids, m = gen.response_ids[row].tolist(), gen.response_mask[row].tolist()
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        assert ids[n:] == [pad] * (len(m) - n)
        ended = eos in ids[:n]
        assert bool(gen.ended_with_eos[row]) == ended
        if ended:
            assert ids.index(eos) == n - 1  # the mask covers exactly up to and including the first EOS
        lengths.append(n)
    assert len(set(lengths)) > 1  # rows of different lengths: padding after EOS was exercised
    assert gen.response_ids.shape[1] == max(lengths)
    short = _greedy(model, tokenizer, PROMPTS, max_new_tokens=2)
    assert short.response_ids.shape == (len(PROMPTS), 2)
    assert short.response_ids.tolist() == gen.response_ids[:, :2].tolist()


def test_sampling_is_reproducible_from_the_generator_seed(policy):
    model, tokenizer = policy
    ids, mask = _encode(tokenizer, PROMPTS)

    def draw(seed):
        return sample(model, ids, mask, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=1.0,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.response_ids.tolist() != c.response_ids.tolist()


def test_mix_epsilon_one_samples_only_from_the_reference(policy):
    model, tokenizer = policy
    with model.disable_adapter():
        base = _greedy(model, tokenizer, PROMPTS)
    adapted = _greedy(model, tokenizer, PROMPTS)
    assert base.response_ids.tolist() != adapted.response_ids.tolist()  # the perturbed adapter matters
    mixed = _greedy(model, tokenizer, PROMPTS, mix_epsilon=1.0, mix_model_context=model.disable_adapter)
    assert mixed.response_ids.tolist() == base.response_ids.tolist()
    assert mixed.response_mask.tolist() == base.response_mask.tolist()
    # the same base tokens as running the policy with the adapter switched off through model_context
    via_context = _greedy(model, tokenizer, PROMPTS, model_context=model.disable_adapter)
    assert via_context.response_ids.tolist() == base.response_ids.tolist()
    # epsilon 0 ignores the reference entirely
    unmixed = _greedy(model, tokenizer, PROMPTS, mix_epsilon=0.0, mix_model_context=model.disable_adapter)
    assert unmixed.response_ids.tolist() == adapted.response_ids.tolist()
    # after the block the adapter is active again
    assert _greedy(model, tokenizer, PROMPTS).response_ids.tolist() == adapted.response_ids.tolist()


# --- the reserved KV cache and grouped prompts ---------------------------------------------------


def test_preallocated_cache_holds_what_a_growing_cache_holds(tiny_spec):
    """Written in place, the cache's keys/values equal DynamicCache's concatenations at every step,
    including past its announced capacity, after repeating rows and after cropping."""
    from transformers import DynamicCache

    from lightrlhf.models.kv_cache import preallocated_cache

    config = load_causal_lm(tiny_spec).module.get_base_model().config
    reserved, growing = preallocated_cache(config, capacity=4), DynamicCache()
    assert type(reserved).__name__ != "DynamicCache"
    generator = torch.Generator().manual_seed(0)
    for length in (3, 1, 1, 2):  # 7 positions: past the capacity of 4
        k, v = torch.randn(2, 4, length, 32, generator=generator), torch.randn(2, 4, length, 32, generator=generator)
        for layer in (0, 1):
            got, want = reserved.update(k, v, layer), growing.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert reserved.get_seq_length() == growing.get_seq_length()
    reserved.batch_repeat_interleave(3)
    growing.batch_repeat_interleave(3)
    k, v = torch.randn(6, 4, 1, 32, generator=generator), torch.randn(6, 4, 1, 32, generator=generator)
    assert torch.equal(reserved.update(k, v, 0)[0], growing.update(k, v, 0)[0])
    reserved.crop(-2)
    growing.crop(-2)
    assert torch.equal(reserved.layers[0].keys, growing.layers[0].keys)


def test_models_with_other_attention_keep_transformers_cache():
    from transformers import DynamicCache, LlamaConfig, MistralConfig, Qwen2Config

    from lightrlhf.models.kv_cache import preallocated_cache

    assert type(preallocated_cache(MistralConfig(sliding_window=64), 8)) is DynamicCache
    assert type(preallocated_cache(None, 8)) is DynamicCache  # a model without a config
    for config in (LlamaConfig(), Qwen2Config()):  # Qwen2's window is off unless use_sliding_window
        assert type(preallocated_cache(config, 8)) is not DynamicCache


def test_a_prompt_sampled_k_times_runs_once_and_draws_what_k_copies_draw(policy):
    """`repeats=k` equals sampling k left-padded copies of each prompt with the same generator (the
    prompt forward differs only in rounding), and feeds each prompt through the model once."""
    model, tokenizer = policy
    ids, mask = _encode(tokenizer, PROMPTS[:3])
    kwargs = dict(max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  temperature=1.0)
    grouped = sample(model, ids, mask, repeats=4, generator=torch.Generator().manual_seed(3), **kwargs)
    copies = sample(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                    generator=torch.Generator().manual_seed(3), **kwargs)
    assert grouped.response_ids.shape[0] == 12
    assert torch.equal(grouped.sequences, copies.sequences)
    assert torch.equal(grouped.attention_mask, copies.attention_mask)
    assert len({tuple(r) for r in grouped.response_ids[:4].tolist()}) > 1  # a group's samples differ

    fed = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].shape))
    try:
        sample(model, ids, mask, repeats=4, generator=torch.Generator().manual_seed(3), **kwargs)
    finally:
        hook.remove()
    assert fed[0] == ids.shape  # the prompts once: 3 rows, not 12
    assert all(shape == (12, 1) for shape in fed[1:])
