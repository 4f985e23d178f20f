"""A tiny Chinese BERT saved like a hub checkpoint, for the encoder reward-model tests.

A character-level vocabulary of the Chinese demo (every character of its language, greetings
included) with BERT's special tokens, and a `BertForMaskedLM` of a given size, saved with
`save_pretrained`: what `model.name_or_path` of an encoder from the hub looks like. `pretrain_mlm`
gives it the masked-LM pretraining (Devlin et al. 2019: 15% of the tokens chosen, of those 80%
[MASK], 10% a random token, 10% kept) that a base needs before LoRA can steer it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import processors
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from lightrlhf.demo.assets import character_tokenizer_core
from lightrlhf.demo.corpus import pretraining_texts
from lightrlhf.demo.language_zh import GREETINGS, PUNCTUATION_ZH, REQUEST_ZH, WORD_ZH

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
DEMO_SIZE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def bert_tokenizer(max_length: int = 128) -> PreTrainedTokenizerFast:
    texts = [*REQUEST_ZH.values(), *WORD_ZH.values(), *PUNCTUATION_ZH.values(), *GREETINGS]
    core = character_tokenizer_core(texts, BERT_SPECIALS, "[UNK]")
    cls, sep = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
                                   padding_side="right")


def save_tiny_bert(out_dir: Path, size: dict | None = None, seed: int = 0, pretrain_steps: int = 0) -> Path:
    """Tokenizer and a BertForMaskedLM (random, or `pretrain_steps` of MLM on the Chinese demo corpus)."""
    tokenizer = bert_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                        pad_token_id=tokenizer.pad_token_id, **(size or SMALL))
    model = BertForMaskedLM(config)
    if pretrain_steps:
        pretrain_mlm(model, tokenizer, pretrain_steps, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def pretrain_mlm(model: BertForMaskedLM, tokenizer, steps: int, seed: int, batch_size: int = 64,
                 lr: float = 2e-3, corpus_size: int = 40000) -> None:
    texts = pretraining_texts(corpus_size, seed, language="zh")
    ids = [tokenizer(p, r)["input_ids"] if p else tokenizer(r)["input_ids"] for p, r in texts]
    specials = torch.tensor([tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        rows = [ids[i] for i in torch.randint(len(ids), (batch_size,), generator=generator).tolist()]
        input_ids = torch.full((batch_size, max(map(len, rows))), tokenizer.pad_token_id)
        for r, row in enumerate(rows):
            input_ids[r, :len(row)] = torch.tensor(row)
        chosen = (torch.rand(input_ids.shape, generator=generator) < 0.15) & ~torch.isin(input_ids, specials)
        labels = input_ids.masked_fill(~chosen, -100)
        draw = torch.rand(input_ids.shape, generator=generator)
        masked = input_ids.masked_fill(chosen & (draw < 0.8), tokenizer.mask_token_id)
        swap = chosen & (draw >= 0.8) & (draw < 0.9)
        masked[swap] = torch.randint(len(BERT_SPECIALS), len(tokenizer), (int(swap.sum()),), generator=generator)
        loss = model(input_ids=masked, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"mlm step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
