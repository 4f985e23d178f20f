"""The reward model's bare-PyTorch floor (bench/rm_floor.py): it runs PEERS.md's pairwise step on the
assets' tiny-llama-rm and learns; `make bench` runs it beside `stage=rm`."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lightrlhf.bench import rm_floor
from lightrlhf.bench.__main__ import NAMES
from lightrlhf.bench.workload import configurations


def _assets(root, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(root / "tiny-llama-rm")
    tokenizer.save_pretrained(root / "tiny-llama-rm")
    words = ["good", "bad", "river", "stone", "light", "music"]
    with open(root / "pref.jsonl", "w") as f:  # chosen and rejected: the same words, so one length
        for i in range(32):
            picked = [words[(i + j) % len(words)] for j in range(4)]
            f.write(json.dumps({"prompt": "say :", "chosen": " good " + " ".join(picked),
                                "rejected": " bad " + " ".join(picked)}) + "\n")
    return root


def test_the_floor_trains_the_pairwise_loss_and_reports_pairs_per_second(tmp_path, tiny_tokenizer):
    assets = _assets(tmp_path, tiny_tokenizer)
    done = subprocess.run([sys.executable, rm_floor.__file__, "--assets", str(assets), "--steps", "30",
                           "--batch", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    result = json.loads(line[len("BENCH_RESULT "):])
    assert result["unit"] == "pairs/s" and result["throughput"] > 0 and result["steps"] == 30
    # "good" always wins: LoRA on q/k/v/o and the score head learn it
    assert result["first_loss"] > 0.6 and result["final_loss"] < result["first_loss"] - 0.1
    lora = 2 * (4 * 2 * 16 * 32)  # 2 layers x 4 projections x (A: 16x32 + B: 32x16)
    assert result["trainable_params"] == lora + 32  # + the score head (no bias)


def test_unequal_lengths_are_refused_in_one_line(tmp_path, tiny_tokenizer):
    assets = _assets(tmp_path, tiny_tokenizer)
    with open(assets / "pref.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "say :", "chosen": " good", "rejected": " bad river stone light"}) + "\n")
    done = subprocess.run([sys.executable, rm_floor.__file__, "--assets", str(assets), "--steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"{assets / 'pref.jsonl'}: sequences of 6 to 10 tokens")
    assert "Traceback" not in done.stderr


def test_make_bench_runs_it_beside_the_reward_model(tmp_path):
    config = configurations(tmp_path, None)["rm_floor"]
    assert config.script == rm_floor.__file__ and config.unit == "pairs/s" and config.units_per_step == 16
    assert NAMES.index("rm_floor") == NAMES.index("rm") + 1
