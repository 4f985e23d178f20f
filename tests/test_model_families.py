"""The shipped real-model configs (gpt2, Qwen2.5, Llama 3.2) run through the real loading code.

The hub is out of reach here, so each family gets a tiny random stand-in of the same architecture
(same module names, so the configs' LoRA targets are checked for real), saved as an ordinary model
directory; only `model.name_or_path` is overridden. Each trains for two SFT steps and exports.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_in_process
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

pytestmark = pytest.mark.slow


def _standin(family: str, tokenizer):
    vocab, ids = len(tokenizer), dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids))
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **ids)
    if family == "qwen2_5_0_5b":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))


@pytest.mark.parametrize("family", ["gpt2", "qwen2_5_0_5b", "llama3_2_1b"])
def test_shipped_model_config_trains_on_a_stand_in(family, tiny_tokenizer, tmp_path):
    model_dir = tmp_path / family
    _standin(family, tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    run_in_process(["stage=sft", f"model={family}", f"model.name_or_path={model_dir}", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "stage.eval.num_prompts=4", "stage.datamodule.batch_size=4"],
                   run_dir)
    manifest = json.loads((run_dir / "export" / "lightrlhf.json").read_text())
    assert manifest["weights"] == "adapter" and manifest["base"]["name_or_path"] == str(model_dir)
    adapter = json.loads((run_dir / "export" / "adapter_config.json").read_text())
    assert adapter["r"] == manifest["config"]["model"]["lora"]["r"]
    wanted = ("c_attn", "c_fc") if family == "gpt2" else ("q_proj", "down_proj")  # all-linear expands to paths
    assert all(any(t.split(".")[-1] == w for t in adapter["target_modules"]) for w in wanted)
