"""The reusable rollout: k responses per prompt, log-probs at the sampling distribution, no critic unless asked."""

from __future__ import annotations

import pytest
import torch

from lightrlhf.models.actor_critic import PolicySpec, ValueSpec, load_actor_critic
from lightrlhf.rewards.functions import length_words
from lightrlhf.rewards.spec import Component, RewardSpec
from lightrlhf.rl import token_logprobs
from lightrlhf.rollouts.rollout import repeat_each, roll_out, sample_responses
from lightrlhf.rollouts.specs import GenerationSpec

PROMPTS = ["explain river rain :", "describe a calm lake :", "tell me about stone :"]
REWARD = RewardSpec(path=None, components={"length": Component(length_words)})


@pytest.fixture(scope="module")
def actor(tiny_spec, tiny_tokenizer):
    torch.manual_seed(0)
    return load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(None), reward=REWARD, critic=False)


def _ids(tokenizer):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_without_a_critic_there_is_no_value_adapter_and_nothing_of_it_trains(actor, tiny_spec, tiny_tokenizer):
    assert not actor.has_critic and actor.value_head is None
    assert "value" not in actor.module.peft_config
    names = actor.trainable_parameter_names()
    assert names and all(".policy." in n for n in names)
    with pytest.raises(RuntimeError, match="without a critic"):
        actor.values(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))
    with_critic = load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(None), reward=REWARD,
                                    value=ValueSpec("fresh"), critic=True)
    assert with_critic.has_critic and "value" in with_critic.module.peft_config
    assert any(n.startswith("value_head.") for n in with_critic.trainable_parameter_names())


def test_k_responses_per_prompt_are_grouped_prompt_major(actor, tiny_tokenizer):
    spec = GenerationSpec(max_new_tokens=6, temperature=1.0)
    roll = roll_out(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(0), group_size=4)
    assert roll.rows == 12 and roll.group_size == 4
    assert roll.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert roll.prompts == repeat_each(PROMPTS, 4) and len(roll.texts) == 12
    # every row of a group starts with its prompt's tokens (left-padded to the widest prompt)
    for row in range(12):
        prompt = _ids(tiny_tokenizer)[row // 4]
        width = roll.prompt_width
        assert roll.sequences[row, width - len(prompt):width].tolist() == prompt
    # the k samples of a prompt differ (sampling, not k copies of one draw)
    assert len(set(roll.texts[:4])) > 1
    assert roll.values is None  # no critic, no values
    # a fresh adapter is the reference: ratio 1 and KL 0 at step 0, on every row of every group
    assert torch.equal(roll.logprobs * roll.mask, roll.ref_logprobs * roll.mask)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7)])
def test_logprobs_are_those_of_the_full_temperature_scaled_distribution_under_top_k_top_p(actor, tiny_tokenizer,
                                                                                          top_k, top_p):
    """Sampling is filtered; the log-probs are not (rollouts/rollout.py explains why). Checked against the
    policy's own logits with no filter, and shown to differ from the filtered distribution's log-probs."""
    spec = GenerationSpec(max_new_tokens=6, temperature=0.7, top_k=top_k, top_p=top_p)
    roll = roll_out(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(1))
    logits = actor.policy_logits(roll.sequences, roll.attention_mask)[:, roll.prompt_width - 1:-1]
    expected = token_logprobs(logits, roll.responses, 0.7)
    torch.testing.assert_close(roll.logprobs * roll.mask, expected * roll.mask, rtol=0, atol=1e-6)
    from lightrlhf.rl.next_token import filter_logits

    filtered = token_logprobs(filter_logits(logits.float() / 0.7, top_k, top_p), roll.responses, 1.0)
    assert torch.where(roll.mask.bool(), (filtered - expected).abs(), 0).max() > 1e-3  # renormalised: it differs


def test_the_reference_samples_with_the_adapter_off(actor, tiny_tokenizer):
    spec = GenerationSpec(max_new_tokens=6)
    with torch.no_grad():
        for param in actor.module.parameters():
            if param.requires_grad:
                param.add_(0.5)  # move the policy away from the reference
    try:
        policy = sample_responses(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(2))
        reference = sample_responses(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, spec,
                                     torch.Generator().manual_seed(2), reference=True)
        with actor.module.disable_adapter():
            from lightrlhf.models.generation import left_pad, sample

            ids, mask = left_pad(_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id)
            plain = sample(actor.module, ids, mask, max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
                           pad_token_id=tiny_tokenizer.pad_token_id, generator=torch.Generator().manual_seed(2))
        assert torch.equal(reference.responses, plain.response_ids)
        assert not torch.equal(policy.responses, reference.responses)
    finally:
        with torch.no_grad():
            for param in actor.module.parameters():
                if param.requires_grad:
                    param.sub_(0.5)


def test_a_group_runs_its_prompt_once_and_scores_as_whole_rows_do(actor, tiny_tokenizer):
    """Log-probs, entropy and the policy's gradient from the shared-prompt forward of a group equal
    those of k full prompt + response rows (to float rounding), in every chunking."""
    saved = {n: p.detach().clone() for n, p in actor.module.named_parameters() if "lora_B" in n}
    try:
        _check_group_scoring(actor, tiny_tokenizer)
    finally:  # the module's other tests need the fresh adapter back
        with torch.no_grad():
            for name, p in actor.module.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def _check_group_scoring(actor, tiny_tokenizer):
    from dataclasses import replace

    from lightrlhf.rollouts.rollout import policy_statistics, token_statistics

    with torch.no_grad():  # an adapter that differs from the reference, so the two forwards differ
        for name, p in actor.module.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    spec = GenerationSpec(max_new_tokens=8, temperature=0.7)
    responses = sample_responses(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, spec,
                                 torch.Generator().manual_seed(2), group_size=4)
    rows_whole = replace(responses, group_size=1)  # the same rows, each run with its own prompt
    want = token_statistics(actor, rows_whole, 0.7, None, with_values=False)
    assert not torch.allclose(want["logprobs"], want["ref_logprobs"])
    for forward_batch_size in (None, 4, 6):  # 6 rounds down to whole groups of 4
        got = token_statistics(actor, responses, 0.7, forward_batch_size, with_values=False)
        mask = responses.mask.bool()
        for key in ("logprobs", "ref_logprobs", "entropy"):
            assert torch.allclose(got[key][mask], want[key][mask], atol=1e-5), key

    grads = []
    for batch in (responses, rows_whole):
        actor.module.zero_grad()
        stats = policy_statistics(actor, batch, 0.7)
        (stats["logprobs_graph"] * batch.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in actor.module.named_parameters() if p.grad is not None]))
    actor.module.zero_grad()
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_group_order_shuffles_whole_groups_by_hand():
    from lightrlhf.rollouts.rollout import group_order

    generator = torch.Generator().manual_seed(0)
    groups = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()  # the same draw
    order = group_order(6, 2, generator).tolist()
    assert order == [row for g in groups for row in (2 * g, 2 * g + 1)]
    assert sorted(order) == list(range(6)) and groups != [0, 1, 2]


@pytest.fixture
def trained_actor(tiny_spec, tiny_tokenizer):
    """A policy whose adapter is not the identity (a fresh LoRA's B is zero: merging it changes nothing)."""
    torch.manual_seed(0)
    actor = load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(None), reward=REWARD, critic=False)
    with torch.no_grad():
        for name, param in actor.module.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.normal_(std=0.05)
    return actor


def test_sampling_with_the_adapter_merged_draws_the_same_and_restores_the_base_bit_for_bit(trained_actor, tiny_tokenizer):
    from dataclasses import replace

    from peft.tuners.lora import LoraLayer

    from lightrlhf.models.adapters import merged_adapter

    actor, module = trained_actor, trained_actor.module
    before = {name: param.detach().clone() for name, param in module.named_parameters()}
    spec = GenerationSpec(max_new_tokens=10)
    merged = sample_responses(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, spec, torch.Generator().manual_seed(3),
                              group_size=4)
    plain = sample_responses(actor, _ids(tiny_tokenizer), PROMPTS, PROMPTS, replace(spec, merge_adapter=False),
                             torch.Generator().manual_seed(3), group_size=4)
    assert torch.equal(merged.responses, plain.responses) and merged.texts == plain.texts
    # every weight, the frozen base (the reference) included, is exactly what it was
    assert all(torch.equal(before[name], param) for name, param in module.named_parameters())

    ids, mask = merged.sequences, merged.attention_mask
    with torch.no_grad():
        policy = actor.policy_logits(ids, mask)
        reference = actor.reference_logits(ids, mask)
        with actor.policy_context(), merged_adapter(module):
            assert any(layer.merged for layer in module.modules() if isinstance(layer, LoraLayer))
            folded = actor.policy_logits(ids, mask)
        with actor.reference_context(), merged_adapter(module):  # adapter off: nothing to fold
            assert not any(layer.merged for layer in module.modules() if isinstance(layer, LoraLayer))
            assert torch.equal(actor.reference_logits(ids, mask), reference)
    assert (policy - reference).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(folded, policy, atol=1e-5, rtol=1e-5)  # ... and folded computes the same
    assert all(torch.equal(before[name], param) for name, param in module.named_parameters())
