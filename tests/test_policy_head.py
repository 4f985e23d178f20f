"""`policy.adapt_head`: the policy adapter also adapts the output head, and nothing else changes.

The reference is still the base with every adapter off, KL is still exactly 0 at step 0, the value
adapter stays below the head, and sampling with the adapter folded in never writes a LoRA delta into
an embedding that the head shares (a tied head, as in gpt2 or Qwen2.5).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lightrlhf.models.actor_critic import PolicySpec, ValueSpec, load_actor_critic, with_output_head
from lightrlhf.models.adapters import merged_adapter
from lightrlhf.rewards.functions import length_words
from lightrlhf.rewards.spec import Component, RewardSpec
from lightrlhf.rollouts.rollout import roll_out
from lightrlhf.rollouts.specs import GenerationSpec

REWARD = RewardSpec(path=None, components={"length": Component(length_words)})
PROMPTS = ["explain river rain :", "describe a calm lake :"]


def _tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_all_linear_is_spelled_out_with_the_head_and_a_list_or_pattern_gains_it():
    model = _tiny_llama(tied=False)
    spelled = with_output_head(LoraConfig(r=4, target_modules="all-linear"), model)
    assert sorted(spelled.target_modules) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                              "up_proj", "v_proj"]
    assert sorted(with_output_head(LoraConfig(r=4, target_modules=["q_proj"]), model).target_modules) == [
        "lm_head", "q_proj"]
    pattern = with_output_head(LoraConfig(r=4, target_modules=r".*\.q_proj"), model).target_modules
    adapted = get_peft_model(_tiny_llama(tied=False), LoraConfig(r=4, target_modules=pattern))
    names = {name for name, _ in adapted.named_modules() if name.endswith("lora_A")}
    assert any("lm_head" in n for n in names) and any("q_proj" in n for n in names)
    assert not any("k_proj" in n for n in names)


def test_the_policy_adapts_the_head_and_the_value_adapter_does_not(tiny_spec, tiny_tokenizer):
    torch.manual_seed(0)
    actor = load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(None, adapt_head=True), reward=REWARD,
                              value=ValueSpec("fresh"), critic=True)
    trainable = actor.trainable_parameter_names()
    assert any("lm_head.lora_A.policy" in n for n in trainable)
    assert not any("lm_head" in n and ".value." in n for n in trainable)
    plain = load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(None), reward=REWARD, critic=False)
    assert not any("lm_head" in n for n in plain.trainable_parameter_names())

    # a fresh adapter is the reference, head included: ratio 1 and KL 0 at step 0
    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    spec = GenerationSpec(max_new_tokens=6)
    roll = roll_out(actor, ids, PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(0), with_values=True)
    assert torch.equal(roll.logprobs * roll.mask, roll.ref_logprobs * roll.mask)

    # a trained head delta moves the policy and leaves the reference where it was
    head = actor.module.base_model.model.lm_head
    with torch.no_grad():
        head.lora_B["policy"].weight.normal_(std=0.5)
    moved = roll_out(actor, ids, PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(0), with_values=True)
    sequences, mask = moved.sequences, moved.attention_mask
    assert not torch.allclose(actor.policy_logits(sequences, mask), actor.reference_logits(sequences, mask))
    # the log-probs the sampler's merged weights gave equal the unmerged rescoring (PPO's first ratio is 1)
    rescored = roll_out(actor, ids, PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rescored.logprobs, moved.logprobs)


@pytest.mark.parametrize("tied", [False, True])
def test_sampling_with_an_adapted_head_folds_it_in_only_when_the_head_is_not_tied(tied):
    model = get_peft_model(_tiny_llama(tied), with_output_head(LoraConfig(r=4, target_modules="all-linear"),
                                                               _tiny_llama(tied)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    ids = torch.tensor([[5, 6, 7, 8]])
    embedding = model.get_input_embeddings().weight
    before, head_before = embedding.detach().clone(), model.base_model.model.lm_head.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with merged_adapter(model):
            inside = model(input_ids=ids).logits
            embedding_inside = embedding.detach().clone()
    torch.testing.assert_close(inside, unmerged, rtol=1e-5, atol=1e-5)
    # tied: nothing was folded (the embedding never held the head's delta); untied: folded and restored
    assert torch.equal(embedding_inside, before)
    assert torch.equal(model.base_model.model.lm_head.base_layer.weight, head_before)
