"""A masked language model (BERT-style encoder) as a conditional infiller, and mask-predict generation.

Layout. A masked LM generates a response by filling a slot of L positions behind the prompt:

    [CLS] prompt [SEP] | y_1 ... y_n [SEP] [PAD] ... [PAD] |        (the slot: L positions, all attended)

The response is followed by [SEP] and [PAD] fillers up to L; the model learns to predict those like
any token, so the response's length is a prediction too. Why a fixed slot rather than CMLM's length
classifier (Ghazvininejad et al. 2019 predict the length first, then fill exactly that many masks):
one forward pass gives both the words and where they stop, the log-likelihood of an infill covers its
length without a second model, and a response of the demo's size (at most ~20 characters) fits a slot
of 24 with room. L is the model's `config.response_slot` (24 for `model=tiny_bert_zh`); a response
longer than L is cut and has no [SEP] (as a causal response without EOS). The text of a slot is what
precedes its first special token; it "ended" when that token is [SEP].

Mask-predict (Ghazvininejad et al. 2019, "Mask-Predict: Parallel Decoding of Conditional Masked
Language Models", Sect. 3): start with every slot position [MASK]; iteration 0 predicts all of them;
iteration t = 1 .. T-1 re-masks the n = floor(L (T - t) / T) positions of lowest confidence (the
probability the model gave the token it chose, kept from when it was chosen) and predicts those
again, the others staying as they are. `remasking=random` re-masks n positions drawn at random
instead (the masked-diffusion sampler of Austin et al. 2021 / LLaDA's "random remasking"). Tokens are
drawn at `temperature` from the `top_k` most likely (temperature 0: argmax, the paper's rule); the
model never writes [MASK], [CLS] or [UNK] into an answer. All randomness comes from the caller's
generator: the same seed gives the same infills.

`python -m lightrlhf.models.masked_lm fill "你好，[MASK][MASK]！"` completes a text (the [MASK]
positions only) with the shipped `model=tiny_bert_zh`; `--prompt` gives a prompt for the slot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lightrlhf.errors import UserError
from lightrlhf.models.adapters import adapter_parameter_names
from lightrlhf.models.loading import BaseIdentity, _quiet_transformers, resolve_model_dir, weights_fingerprint
from lightrlhf.models.spec import ModelSpec
from lightrlhf.rl.next_token import sample_tokens
from lightrlhf.validation import non_negative, one_of, positive

SLOT_KEY = "response_slot"  # the slot length L in the model's config.json
ADAPTER = "default"
REMASKING = ("low_confidence", "random")


# -- the layout -------------------------------------------------------------------------------------
def slot_of(model_config) -> int:
    slot = getattr(model_config, SLOT_KEY, None)
    if not isinstance(slot, int) or slot < 1:
        raise UserError(f"model config has no {SLOT_KEY} (the response slot length of a lightrlhf masked LM)")
    return slot


def slot_ids(tokenizer, response_ids: Sequence[int], slot: int) -> list[int]:
    """The slot of a known response: its ids, [SEP], [PAD] fillers to `slot` (cut at `slot`, no [SEP],
    when longer)."""
    ids = list(response_ids)[:slot]
    if len(ids) < slot:
        ids.append(tokenizer.sep_token_id)
    return ids + [tokenizer.pad_token_id] * (slot - len(ids))


@dataclass
class InfillBatch:
    """Rows `[CLS] prompt [SEP] slot`, right-padded (padding not attended); `slot_mask` marks the slot."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    slot_mask: Tensor  # [B, T] bool

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def slots(self, ids: Tensor | None = None) -> Tensor:
        """[B, L] the slot's tokens of `ids` (default: this batch's)."""
        ids = self.input_ids if ids is None else ids
        return ids[self.slot_mask].view(self.rows, -1)

    def with_slots(self, slots: Tensor) -> InfillBatch:
        ids = self.input_ids.clone()
        ids[self.slot_mask] = slots.reshape(-1).to(ids.dtype)
        return InfillBatch(ids, self.attention_mask, self.slot_mask)

    def repeat(self, times: int) -> InfillBatch:
        """Each row `times` times in a row: [a, b] -> [a, a, b, b]."""
        return InfillBatch(*(t.repeat_interleave(times, dim=0) for t in (self.input_ids, self.attention_mask,
                                                                          self.slot_mask)))


def infill_batch(tokenizer, prompt_ids: Sequence[Sequence[int]], slots: Sequence[Sequence[int]]) -> InfillBatch:
    """Rows of prompt ids (with their [CLS] ... [SEP], as the tokenizer writes them) and slot ids."""
    rows = [list(p) + list(s) for p, s in zip(prompt_ids, slots, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    slot_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention[i, :len(row)] = 1
        slot_mask[i, len(p):len(row)] = True
    return InfillBatch(ids, attention, slot_mask)


def masked_prompts(tokenizer, prompt_ids: Sequence[Sequence[int]], slot: int) -> InfillBatch:
    """Prompts with an all-[MASK] slot: what mask-predict starts from."""
    return infill_batch(tokenizer, prompt_ids, [[tokenizer.mask_token_id] * slot] * len(prompt_ids))


def decode_slots(tokenizer, slots: Tensor) -> tuple[list[str], Tensor]:
    """(texts, ended [B] bool): each slot's text before its first special token; ended when that is [SEP]."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    is_special = torch.isin(slots, special)
    first = torch.where(is_special.any(1), is_special.float().argmax(1), torch.full((slots.shape[0],), slots.shape[1]))
    ended = torch.zeros(slots.shape[0], dtype=torch.bool)
    texts = []
    for i, stop in enumerate(first.tolist()):
        texts.append(tokenizer.decode(slots[i, :stop].tolist(), skip_special_tokens=True))
        ended[i] = stop < slots.shape[1] and int(slots[i, stop]) == tokenizer.sep_token_id
    return texts, ended


def response_lengths(tokenizer, slots: Tensor) -> Tensor:
    """[B] tokens before the first special token of each slot."""
    special = torch.isin(slots, torch.tensor(sorted(set(tokenizer.all_special_ids))))
    return torch.where(special.any(1), special.float().argmax(1), torch.full((slots.shape[0],), slots.shape[1])).float()


# -- mask-predict -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskPredictSpec:
    """How a masked LM fills its masks (see module docstring).

    iterations: T, forward passes per fill (1: predict every mask at once).
    temperature: 0 = argmax (the paper's rule); > 0 samples.  top_k: sample among the k most likely (0 = off).
    remasking: random (the default: on tiny_bert_zh low_confidence keeps a confident early [SEP], giving
      infills of ~4 characters where the corpus has ~10) or low_confidence (the paper's).
    response_length: the slot length L for prompts; None = the model's own (`config.response_slot`).
    """

    iterations: int = 10
    temperature: float = 1.0
    top_k: int = 0
    remasking: Literal["low_confidence", "random"] = "random"
    response_length: int | None = None

    def __post_init__(self) -> None:
        positive("iterations", self.iterations)
        non_negative("temperature", self.temperature)
        non_negative("top_k", self.top_k)
        one_of("remasking", self.remasking, REMASKING)
        if self.response_length is not None:
            positive("response_length", self.response_length)


def remask_count(fill_count: Tensor, iteration: int, iterations: int) -> Tensor:
    """n = floor(L (T - t) / T): how many of a row's L fillable positions iteration t masks again."""
    return torch.div(fill_count * (iterations - iteration), iterations, rounding_mode="floor")


def lowest(scores: Tensor, eligible: Tensor, count: Tensor) -> Tensor:
    """[B, T] bool: in each row, the `count` eligible positions of lowest score (ties: lower index first)."""
    keyed = torch.where(eligible, scores.double(), math.inf)
    order = torch.sort(keyed, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return (rank < count[:, None]) & eligible


@torch.no_grad()
def mask_predict(model: nn.Module, batch: InfillBatch, fill: Tensor, spec: MaskPredictSpec, mask_token_id: int,
                 banned_ids: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """The rows of `batch` with the positions of `fill` [B, T] (bool) filled in; [B, T] long.

    `model(input_ids=..., attention_mask=...).logits` is a masked LM's [B, T, V]."""
    ids = batch.input_ids.clone()
    ids[fill] = mask_token_id
    confidence = torch.zeros(ids.shape, dtype=torch.float32)
    fill_count = fill.sum(1)
    for t in range(spec.iterations):
        if t == 0:
            masked = fill.clone()
        else:
            count = remask_count(fill_count, t, spec.iterations)
            if not bool(count.any()):
                break
            scores = confidence if spec.remasking == "low_confidence" else torch.rand(ids.shape, generator=generator)
            masked = lowest(scores, fill, count)
            ids[masked] = mask_token_id
        if not bool(masked.any()):
            break
        logits = model(input_ids=ids, attention_mask=batch.attention_mask).logits[masked].float()
        logits[:, list(banned_ids)] = float("-inf")
        tokens = sample_tokens(logits, spec.temperature, spec.top_k, generator=generator)
        ids[masked] = tokens
        confidence[masked] = torch.softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return ids


def banned_ids(tokenizer) -> list[int]:
    """Tokens an answer never holds: [MASK], [CLS], [UNK]."""
    return sorted({i for i in (tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.unk_token_id) if i is not None})


# -- the model ----------------------------------------------------------------------------------------
class MaskedLM(nn.Module):
    """A masked LM with one LoRA adapter ("default") on its frozen weights, or all weights trainable.

    The reference (the model a run starts from) is the adapter switched off."""

    def __init__(self, module: nn.Module, tokenizer, spec: ModelSpec, base: BaseIdentity):
        super().__init__()
        self.module, self.tokenizer, self.spec, self.base = module, tokenizer, spec, base
        if spec.lora is None:
            module.requires_grad_(True)
            self._trainable = [n for n, _ in module.named_parameters()]
        else:
            self._trainable = adapter_parameter_names(module, ADAPTER)
            trainable = set(self._trainable)
            for name, param in module.named_parameters():
                param.requires_grad_(name in trainable)
        self.slot = slot_of(self.config)

    @property
    def config(self):
        return self.module.config

    @property
    def is_adapter(self) -> bool:
        return self.spec.lora is not None

    def trainable_parameter_names(self) -> list[str]:
        return [f"module.{n}" for n in self._trainable]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.module(input_ids=input_ids, attention_mask=attention_mask).logits

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The start model's logits (the adapter off; the model itself without one)."""
        if not self.is_adapter:
            raise RuntimeError("a fully fine-tuned masked LM keeps no reference")
        with self.module.disable_adapter():
            return self.module(input_ids=input_ids, attention_mask=attention_mask).logits

    def train(self, mode: bool = True) -> MaskedLM:
        # detail: dropout stays off (the model trains on its own samples, scored as they were drawn)
        return super().train(False)

    def merged_model(self) -> nn.Module:
        import copy

        return copy.deepcopy(self.module).merge_and_unload() if self.is_adapter else self.module


def check_masked_lm_dir(directory: Path, key: str) -> None:
    config = directory / "config.json"
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        raise UserError(f"{key}: {directory} is not a model directory (no readable config.json)") from None
    architectures = meta.get("architectures") or []
    if not any(a.endswith("ForMaskedLM") for a in architectures):
        raise UserError(f"{key}: {directory} is not a masked language model (architectures: "
                        f"{', '.join(architectures) or 'none'}); it needs a *ForMaskedLM model")
    if SLOT_KEY not in meta:
        raise UserError(f"{key}: {directory} has no {SLOT_KEY} in config.json (a lightrlhf masked LM records "
                        "the length of its response slot)")


def load_masked_module(directory: Path, dtype: str = "float32", key: str = "model.name_or_path") -> nn.Module:
    _quiet_transformers()
    from transformers import AutoModelForMaskedLM

    check_masked_lm_dir(directory, key)
    return AutoModelForMaskedLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()


def load_masked_lm(spec: ModelSpec, tokenizer=None) -> MaskedLM:
    """Config target: the masked LM of `spec` frozen, with a fresh LoRA adapter (or all weights trainable)."""
    from lightrlhf.models.loading import load_tokenizer

    directory = resolve_model_dir(spec.name_or_path, spec.revision)
    module = load_masked_module(directory, spec.dtype, key="config model.name_or_path")
    module.requires_grad_(False)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    if tokenizer.mask_token_id is None or tokenizer.sep_token_id is None:
        raise UserError(f"config model.name_or_path: the tokenizer of {directory} has no [MASK] or [SEP] token")
    identity = BaseIdentity(str(directory), weights_fingerprint(directory, key="model.name_or_path"))
    if spec.lora is not None:
        from peft import get_peft_model

        # detail: no task type: peft's masked-LM wrapper does not exist, the plain one adapts every
        # linear layer but the output head (the decoder tied to the embeddings)
        module = get_peft_model(module, spec.lora.to_peft(task_type=None), adapter_name=ADAPTER)
    return MaskedLM(module, tokenizer, spec, identity)


def export_masked_lm(model: MaskedLM, out_dir: Path, *, stage: str, config: dict | None, metrics: dict | None) -> Path:
    """Full weights (the adapter folded in: the model is small), tokenizer and manifest; loads with
    `AutoModelForMaskedLM` and `--model` of the fill command."""
    from lightrlhf.io import atomic_directory
    from lightrlhf.models.export import manifest, write_manifest

    with atomic_directory(out_dir) as staging:
        model.merged_model().save_pretrained(staging, safe_serialization=True)
        model.tokenizer.save_pretrained(staging)
        write_manifest(staging, manifest(stage=stage, kind="masked_lm", weights="full", base=model.base,
                                         config=config, metrics=metrics))
    return Path(out_dir)


# -- the fill command -------------------------------------------------------------------------------
def fill_text(module: nn.Module, tokenizer, text: str, prompt: str = "", spec: MaskPredictSpec = MaskPredictSpec(),
              seed: int = 0) -> str:
    """`text` with its [MASK] tokens filled in by mask-predict, the rest kept as written.

    The text is the response slot behind `prompt` (empty: a sentence on its own, as the corpus's
    greetings are): its ids, then [SEP] and fillers to the model's slot length, as in pretraining."""
    response = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.mask_token_id not in response:
        raise UserError(f"fill: the text has no {tokenizer.mask_token} to fill: {text!r}")
    slot = spec.response_length or slot_of(module.config)
    ids = response + [tokenizer.sep_token_id] + [tokenizer.pad_token_id] * max(0, slot - len(response) - 1)
    prompt_ids = tokenizer(prompt)["input_ids"]
    batch = infill_batch(tokenizer, [prompt_ids], [ids])
    fill = batch.input_ids == tokenizer.mask_token_id
    out = mask_predict(module, batch, fill, spec, tokenizer.mask_token_id, banned_ids(tokenizer),
                       torch.Generator().manual_seed(seed))
    filled = batch.slots(out)[0, :len(response)].tolist()
    # detail: a mask the model filled with [SEP] or [PAD] means "shorter": such fillers are not shown
    return tokenizer.decode(filled, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightrlhf.models.masked_lm",
                                     description="Fill the [MASK] tokens of a text with a masked language model "
                                                 "(mask-predict).")
    commands = parser.add_subparsers(dest="command", required=True)
    fill = commands.add_parser("fill", help='complete a text, e.g. "你好，[MASK][MASK]！"')
    fill.add_argument("text")
    fill.add_argument("--prompt", default="", help="a prompt the text answers (default: none)")
    fill.add_argument("--model", default=None, help="masked LM directory (default: the shipped tiny_bert_zh)")
    fill.add_argument("--seed", type=int, default=0)
    fill.add_argument("--iterations", type=int, default=MaskPredictSpec.iterations)
    fill.add_argument("--temperature", type=float, default=0.0, help="0 = the most likely tokens (default)")
    fill.add_argument("--top-k", type=int, default=0)
    fill.add_argument("--remasking", default="low_confidence", choices=REMASKING)
    args = parser.parse_args(argv)
    try:
        from lightrlhf.errors import ConfigValueError

        try:
            spec = MaskPredictSpec(iterations=args.iterations, temperature=args.temperature, top_k=args.top_k,
                                   remasking=args.remasking)
        except ConfigValueError as error:
            raise UserError(f"fill: --{error.param.replace('_', '-')}: {error.problem}") from None
        from lightrlhf.demo.shipped import TINY_BERT_ZH_DIR
        from lightrlhf.models.loading import load_tokenizer

        directory = Path(args.model) if args.model else TINY_BERT_ZH_DIR
        require_dir(directory)
        module = load_masked_module(directory, key="--model")
        tokenizer = load_tokenizer(ModelSpec(name_or_path=str(directory)))
        print(fill_text(module, tokenizer, args.text, args.prompt, spec, args.seed))
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(error.exit_code) from None


def require_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise UserError(f"--model: {directory} is not a directory")


if __name__ == "__main__":
    main()
