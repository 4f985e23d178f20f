"""Build the demo's tokenizer and its small pretrained base model (`model=tiny`).

A randomly initialised model cannot learn SFT through LoRA alone: low-rank updates steer a model
that already knows its language, they do not teach one from scratch. So `model=tiny` is a base
the way gpt2 or Qwen are bases: a ~0.4M-parameter Llama, pretrained with all weights on the demo's
"web" corpus (`corpus.pretraining_texts`). It knows the words and the prompt/answer shape, and
nothing about what makes an answer good. SFT, reward modelling and PPO then run on it with plain
LoRA exactly as they would on a real checkpoint.

The result ships inside the package (`assets/tiny`, about 1.6 MB) so that the demo and the tests
start instantly and offline; `python -m lightrlhf.demo.assets` rebuilds it bit-for-bit on the same
torch build (about a minute on 2 cores).

`model=tiny_zh` (`--language zh`, `assets/tiny_zh`) is the same model pretrained on the Chinese demo
corpus, with a character-level tokenizer trained on that corpus (one token a character, the way
Chinese BERT vocabularies split Han text).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightrlhf.demo.corpus import pretraining_texts
from lightrlhf.demo.language import SPECIAL_TOKENS, vocabulary
from lightrlhf.demo.shipped import TINY_DIR, TINY_ZH_DIR
from lightrlhf.io import atomic_directory

# The size the feasibility figures in the design notes found sufficient; larger costs time and
# teaches the demo nothing more.
TINY_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
                   rms_norm_eps=1e-5, attention_dropout=0.0)

# Mirrors the structure of real chat templates (a BOS, role markers, EOS closing each assistant
# turn) so that chat data and the double-BOS pitfall are exercised on the tiny model too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the demo vocabulary; unknown words (any other language) map to <unk>."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(list(SPECIAL_TOKENS))
    # detail: a BOS in front of every encoded text, as Llama tokenizers do, so the prompt/completion
    # concatenation code is tested against a tokenizer that adds special tokens.
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=TINY_CONFIG["max_position_embeddings"], padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def character_tokenizer_core(texts: list[str], special_tokens: list[str], unk_token: str) -> Tokenizer:
    """A character-level vocabulary trained on `texts`: whitespace separates nothing (and is dropped),
    every other character is one token; characters the corpus never shows map to `unk_token`."""
    core = Tokenizer(models.WordLevel(unk_token=unk_token))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special_tokens, min_frequency=1))
    core.decoder = decoders.Fuse()  # characters join without spaces
    return core


def build_chinese_tokenizer(seed: int = 0, corpus_size: int = 40000) -> PreTrainedTokenizerFast:
    """The causal tokenizer of `model=tiny_zh`: characters of the Chinese pretraining corpus, with the
    same special tokens, BOS handling and chat template as `model=tiny`."""
    texts = [f"{prompt}{response}" for prompt, response in pretraining_texts(corpus_size, seed, language="zh")]
    core = character_tokenizer_core(texts, list(SPECIAL_TOKENS), "<unk>")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=TINY_CONFIG["max_position_embeddings"], padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _batches(ids: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator):
    order = torch.randperm(len(ids), generator=generator).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = [ids[i] for i in order[start:start + batch_size]]
        width = max(map(len, rows))
        input_ids = torch.full((batch_size, width), pad_id)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
        yield input_ids


def pretrain_base(tokenizer: PreTrainedTokenizerFast, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3,
                  corpus_size: int = 40000, seed: int = 0, log_every: int = 100,
                  language: str = "en") -> LlamaForCausalLM:
    """Full-weight next-token training of a fresh tiny Llama on the pretraining corpus."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG)
    model = LlamaForCausalLM(config)
    texts = pretraining_texts(corpus_size, seed, language)
    ids = [tokenizer(f"{prompt} {response}")["input_ids"] + [tokenizer.eos_token_id] for prompt, response in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step, started = 0, time.perf_counter()
    while step < steps:
        for input_ids in _batches(ids, batch_size, tokenizer.pad_token_id, generator):
            labels = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, -100)
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if log_every and step % log_every == 0:
                print(f"step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
            if step >= steps:
                break
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build(out_dir: str | Path | None = None, steps: int = 1500, seed: int = 0, language: str = "en") -> Path:
    """Write tokenizer + pretrained base to `out_dir` (atomically), with a provenance note."""
    out_dir = out_dir or (TINY_ZH_DIR if language == "zh" else TINY_DIR)
    tokenizer = build_chinese_tokenizer(seed) if language == "zh" else build_tokenizer()
    model = pretrain_base(tokenizer, steps=steps, seed=seed, language=language)
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "BUILD.json").write_text(json.dumps(
            {"built_by": "python -m lightrlhf.demo.assets" + (" --language zh" if language == "zh" else ""),
             "steps": steps, "seed": seed,
             "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}, indent=1))
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: the shipped model's directory")
    parser.add_argument("--language", choices=["en", "zh"], default="en")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build(args.out, args.steps, args.seed, args.language)}")


if __name__ == "__main__":
    main()
