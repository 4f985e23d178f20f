"""The memory benchmark's GPT-2-small-shaped assets: the shape, and the two models the peer's PPO reads."""

from __future__ import annotations

import json

import torch

from lightrlhf.bench.memory import SHAPE, build_sized_assets, main, parameter_count


def test_the_shape_holds_gpt2_smalls_parameter_count():
    from transformers import LlamaConfig

    # GPT-2 small: 124.4M; 12 x (4 x 768^2 + 3 x 768 x 2048) + 50257 x 768 (tied) + norms = 123.55M
    count = parameter_count(LlamaConfig(**SHAPE))
    assert count == 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 50257 * 768 + 768 == 123_551_232


def _benchmark_like_source(root, tokenizer):
    """What build_sized_assets reads of the benchmark's assets: the data files, the tokenizer, tiny-llama's config."""
    root.mkdir()
    for name in ("prompts.jsonl", "sft.jsonl", "pref.jsonl"):
        (root / name).write_text('{"prompt": "a b"}\n')
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "tiny-llama").mkdir()
    (root / "tiny-llama" / "config.json").write_text(json.dumps({"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                                                 "hidden_act": "silu"}))
    return root


def test_sized_assets_are_a_tied_causal_model_and_a_reward_model_on_its_backbone(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    small = {**SHAPE, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 64, "vocab_size": len(tiny_tokenizer) + 100}
    source = _benchmark_like_source(tmp_path / "source", tiny_tokenizer)
    out = build_sized_assets(source, tmp_path / "sized", shape=small)
    for name in ("prompts.jsonl", "sft.jsonl", "pref.jsonl", "tokenizer/tokenizer.json", "tiny-llama/tokenizer.json"):
        assert (out / name).is_file(), name
    causal = AutoModelForCausalLM.from_pretrained(out / "tiny-llama")
    reward = AutoModelForSequenceClassification.from_pretrained(out / "tiny-llama-rm", num_labels=1)
    assert causal.config.tie_word_embeddings and causal.lm_head.weight.data_ptr() == causal.model.embed_tokens.weight.data_ptr()
    assert causal.config.vocab_size == len(tiny_tokenizer) + 100 and json.loads((out / "tiny-llama" / "config.json").read_text())["hidden_size"] == 32
    assert reward.score.bias is None and reward.score.weight.abs().sum() > 0
    for key, value in causal.model.state_dict().items():
        assert torch.equal(value, reward.model.state_dict()[key]), key
    assert build_sized_assets(source, out, shape=small) == out  # built once


def test_a_missing_peer_interpreter_is_one_line(tmp_path, capsys):
    assert main(["--peer-python", str(tmp_path / "nowhere" / "python")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --peer-python") and "make bench-peers" in err[0]
