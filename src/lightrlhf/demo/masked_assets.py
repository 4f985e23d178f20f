"""Build `model=tiny_bert_zh`: a small BERT masked LM pretrained on the Chinese demo corpus as an infiller.

What it is: `BertForMaskedLM` (hidden 128, 3 layers, 4 heads, FFN 256, 64 positions; ~0.6M parameters)
with a character-level tokenizer trained on the Chinese pretraining corpus (one token a character, as
Chinese BERT vocabularies split Han text) and BERT's specials [PAD] [UNK] [CLS] [SEP] [MASK].

How it is trained: conditional infilling in the layout of `models/masked_lm.py`,

    [CLS] prompt [SEP] | response [SEP] [PAD] ... |        (a slot of L = 24 positions)

with a masking ratio t ~ U(0, 1] drawn per example and each slot position masked with probability t
(`rl/infill_likelihood.py::draw_masking`), the cross-entropy averaged over the masked positions. The uniform ratio is what CMLM
(Ghazvininejad et al. 2019) and the masked-diffusion LMs (Austin et al. 2021; Sahoo et al. 2024; Nie et
al. 2025, LLaDA) train with: every stage of iterative unmasking -- from the all-[MASK] slot to one
mask left -- is a context the model has seen, so mask-predict works from an empty slot. The prompt is
never masked (the model learns p(response | prompt), not the prompts).

The corpus is `corpus.pretraining_texts(language="zh")` (its greetings are answers to an empty
prompt) plus the sentence 你好，世界！ once in every 200 texts: the corpus's greetings hold 你好，朋友！
as often as 你好，世界！, and on the real web "hello, world" is by far the more common of the two, so
`fill "你好，[MASK][MASK]！"` has one most likely answer rather than a coin toss.

`python -m lightrlhf.demo.masked_assets` rebuilds `assets/tiny_bert_zh` (about two minutes on 2 cores)
and records how in BUILD.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import processors
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from lightrlhf.data.tokenize import token_ids
from lightrlhf.demo.assets import character_tokenizer_core
from lightrlhf.demo.corpus import pretraining_texts
from lightrlhf.demo.shipped import TINY_BERT_ZH_DIR
from lightrlhf.io import atomic_directory
from lightrlhf.models.masked_lm import SLOT_KEY, infill_batch, slot_ids
from lightrlhf.rl.infill_likelihood import draw_masking

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
RESPONSE_SLOT = 24  # the demo's responses are at most ~20 characters
CLASSIC = "你好，世界！"
CLASSIC_EVERY = 200
TINY_BERT_CONFIG = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        type_vocab_size=1)


def build_bert_tokenizer(seed: int = 0, corpus_size: int = 40000) -> PreTrainedTokenizerFast:
    """Characters of the Chinese pretraining corpus with BERT's specials; `[CLS] A [SEP]` around a text.
    [SEP] is also its EOS: a response's ids followed by EOS (data/tokenize.py) are the slot's layout."""
    texts = [f"{prompt}{response}" for prompt, response in pretraining_texts(corpus_size, seed, language="zh")]
    core = character_tokenizer_core(texts, BERT_SPECIAL_TOKENS, "[UNK]")
    cls_id, sep_id = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[SEP]", model_max_length=TINY_BERT_CONFIG["max_position_embeddings"],
        padding_side="right")


def pretraining_pairs(corpus_size: int, seed: int) -> list[tuple[str, str]]:
    out = []
    for i, pair in enumerate(pretraining_texts(corpus_size, seed, language="zh")):
        out.append(pair)
        if i % CLASSIC_EVERY == CLASSIC_EVERY - 1:
            out.append(("", CLASSIC))
    return out


def pretrain(tokenizer: PreTrainedTokenizerFast, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3,
             corpus_size: int = 40000, seed: int = 0, log_every: int = 250) -> BertForMaskedLM:
    """Full-weight masked-LM training of a fresh tiny BERT as an infiller (see module docstring)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT_CONFIG)
    setattr(config, SLOT_KEY, RESPONSE_SLOT)
    model = BertForMaskedLM(config)
    pairs = pretraining_pairs(corpus_size, seed)
    prompts = token_ids(tokenizer, [p for p, _ in pairs], add_special_tokens=True)
    slots = [slot_ids(tokenizer, ids, RESPONSE_SLOT) for ids in token_ids(tokenizer, [r for _, r in pairs])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        rows = order.sample(range(len(pairs)), batch_size)
        batch = infill_batch(tokenizer, [prompts[i] for i in rows], [slots[i] for i in rows])
        slot_masked, _ = draw_masking(batch.rows, RESPONSE_SLOT, generator)
        masked = torch.zeros_like(batch.slot_mask)
        masked[batch.slot_mask] = slot_masked.reshape(-1)
        labels = batch.input_ids.masked_fill(~masked, -100)
        inputs = batch.input_ids.masked_fill(masked, tokenizer.mask_token_id)
        loss = model(input_ids=inputs, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
    return model.eval()


def build(out_dir: str | Path | None = None, steps: int = 2000, seed: int = 0) -> Path:
    """Write tokenizer + pretrained masked LM to `out_dir` (atomically), with a provenance note."""
    out_dir = Path(out_dir or TINY_BERT_ZH_DIR)
    tokenizer = build_bert_tokenizer(seed)
    started = time.perf_counter()
    model = pretrain(tokenizer, steps=steps, seed=seed)
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "BUILD.json").write_text(json.dumps(
            {"built_by": "python -m lightrlhf.demo.masked_assets", "steps": steps, "seed": seed,
             "objective": "masked LM, conditional infilling, masking ratio ~ U(0, 1] per example",
             "response_slot": RESPONSE_SLOT, "parameters": sum(p.numel() for p in model.parameters()),
             "train_seconds": round(time.perf_counter() - started), "torch": torch.__version__}, indent=1))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: the shipped model's directory")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build(args.out, args.steps, args.seed)}")


if __name__ == "__main__":
    main()
