"""LightningDataModules: read a `DataSource`, tokenize, batch, and resume mid-epoch.

Training loaders are torchdata `StatefulDataLoader`s shuffled by their own seeded generator:
Lightning stores their position in every checkpoint, so a resumed run continues with the very
batch an uninterrupted run would have seen next.

Each module keeps a `summary` of what it read (detected format, examples kept, what was dropped or
truncated and why); stages log it, so nothing is filtered silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightrlhf.data.clean import prompt_contents, responses
from lightrlhf.data.formats import LoadReport, load_preferences, load_prompts, load_sft
from lightrlhf.data.profile import DataProfile, summary_scalars
from lightrlhf.data.source import DataSource
from lightrlhf.data.tokenize import (
    PairFeatures,
    Pretokenized,
    SFTFeatures,
    TruncationReport,
    encode_pair,
    encode_prompt,
    encode_sft,
    fit_prompt,
    prompt_text,
    token_counter,
)
from lightrlhf.errors import UserError
from lightrlhf.validation import non_negative, positive

log = logging.getLogger(__name__)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch that depends only on (seed, epoch).

    Lightning calls `set_epoch` at the start of each epoch (as it does for a DistributedSampler),
    so a run resumed mid-epoch replays the same order for the rest of that epoch and for every
    later one. (A shared `torch.Generator` drifts after a mid-epoch restore of a
    StatefulDataLoader -- the next epoch's order then differs from an uninterrupted run.)

    The epoch and the position in it are part of the loader's checkpointed state: a StatefulDataLoader
    restores its position by drawing a new order from the sampler *before* Lightning calls
    `set_epoch` for the resumed epoch, so without its own epoch a run resumed in epoch 1 or later
    finished that epoch in epoch 0's order.
    """

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1):
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> _Order:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            order = length_grouped(order, self.lengths, self.batch_size, generator)
        return _Order(order)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])


# examples sorted by length together: 50 batches, as Hugging Face's LengthGroupedSampler
LENGTH_GROUP_BATCHES = 50


def length_grouped(order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` rearranged so that each run of `batch_size` holds examples of similar length.

    Why: a batch is padded to its longest example, and every padded position costs a full forward and
    backward. On the demo's comparisons (17 tokens on average, up to 27) random batches are a third
    padding. The shuffled order is cut into windows of 50 batches, each window sorted by length (longest
    first) and cut into batches, and the full batches are shuffled; a short last batch stays last, where
    `drop_last` drops it. The batches' contents stay random across windows and epochs.
    """
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    short = [i for b in batches if len(b) < batch_size for i in b]
    return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + short


class _Order:
    """One epoch's order and how far it got (saved and restored by a StatefulDataLoader)."""

    def __init__(self, order: list[int]):
        self.order, self.position = order, 0

    def __iter__(self) -> _Order:
        return self

    def __next__(self) -> int:
        if self.position >= len(self.order):
            raise StopIteration
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def collate_sft(pad_id: int, pack_width: int | None = None) -> Callable[[list[SFTFeatures]], dict[str, torch.Tensor]]:
    """One row per demonstration, padded to the longest; or, with `pack_width`, the same demonstrations
    packed several to a row (`pack_rows`). Both give `token_mask` (the tokens a loss may predict) and
    `completion_mask` (those of the completion and its EOS)."""

    def collate(batch: list[SFTFeatures]) -> dict[str, torch.Tensor]:
        if pack_width is not None:
            return pack_rows(batch, pad_id, pack_width)
        input_ids, attention_mask = right_pad([f.input_ids for f in batch], pad_id)
        positions = torch.arange(input_ids.shape[1])[None, :]
        prompt_lengths = torch.tensor([f.prompt_length for f in batch])[:, None]
        completion_mask = (positions >= prompt_lengths).long() * attention_mask
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_mask": attention_mask,
                "completion_mask": completion_mask}

    return collate


def pack_rows(batch: list[SFTFeatures], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """The batch's demonstrations laid end to end in rows of at most `width` tokens (first-fit,
    longest first), each with position ids restarting at 0.

    Why: a padded batch computes every row to its longest demonstration; the demo's are 17 tokens on
    average and up to 28. The model sees no attention mask but restarting position ids, from which
    transformers (>= 5, `masking_utils.find_packed_sequence_indices`) builds a block-causal mask: a token
    attends only to its own demonstration, so every logit is the unpacked one (to float rounding; tested).
    The padding at a row's end is a segment of its own. The batch holds the same demonstrations as
    unpacked, so the loss (a mean over the batch's tokens) is the same number; the first token of each
    demonstration is taken out of `token_mask`, since in a packed row it would be predicted from the
    previous demonstration (unpacked, a row's first token is never a target)."""
    rows: list[list[SFTFeatures]] = []
    used: list[int] = []
    for feature in sorted(batch, key=lambda f: -len(f.input_ids)):
        slot = next((i for i, n in enumerate(used) if n + len(feature.input_ids) <= width), None)
        if slot is None:
            rows.append([])
            used.append(0)
            slot = len(rows) - 1
        rows[slot].append(feature)
        used[slot] += len(feature.input_ids)
    row_width = max(used)
    input_ids = torch.full((len(rows), row_width), pad_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    token_mask, completion_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        start = 0
        for feature in row:
            n = len(feature.input_ids)
            input_ids[r, start:start + n] = torch.as_tensor(feature.input_ids)
            position_ids[r, start:start + n] = torch.arange(n)
            token_mask[r, start + 1:start + n] = 1
            completion_mask[r, start + max(feature.prompt_length, 1):start + n] = 1
            start += n
        position_ids[r, start:] = torch.arange(row_width - start)  # the tail of padding: a segment of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "token_mask": token_mask,
            "completion_mask": completion_mask}


def collate_pairs(pad_id: int) -> Callable[[list[PairFeatures]], dict[str, torch.Tensor]]:
    """Chosen and rejected padded to one width, so the stage can run them as one [2B, T] batch."""

    def collate(batch: list[PairFeatures]) -> dict[str, torch.Tensor]:
        width = max(max(len(f.chosen_ids), len(f.rejected_ids)) for f in batch)
        chosen_ids, chosen_mask = right_pad([f.chosen_ids for f in batch], pad_id, width)
        rejected_ids, rejected_mask = right_pad([f.rejected_ids for f in batch], pad_id, width)
        return {
            "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
            "margin": torch.tensor([f.margin for f in batch], dtype=torch.float32),
            # response lengths in tokens (EOS included), for the length-bias diagnostics
            "chosen_length": torch.tensor([len(f.chosen_ids) - f.chosen_prompt_length for f in batch]),
            "rejected_length": torch.tensor([len(f.rejected_ids) - f.rejected_prompt_length for f in batch]),
            "index": torch.tensor([f.index for f in batch]),
        }

    return collate


class _SourceDataModule(L.LightningDataModule):
    """Shared plumbing: load train/validation from the source once, build loaders."""

    kind = ""

    def __init__(self, source: DataSource, tokenizer, batch_size: int, eval_batch_size: int | None = 64,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        positive("batch_size", batch_size)
        non_negative("num_workers", num_workers)
        self.source, self.tokenizer = source, tokenizer
        # detail: never build sequences longer than the model's context; a Llama with RoPE would
        # run on them without complaint and produce garbage positions.
        context = getattr(tokenizer, "model_max_length", None) or 0
        self.max_length = min(source.max_length, context) if 0 < context < 1_000_000 else source.max_length
        self.max_prompt_length = min(source.max_prompt_length, self.max_length - 1)
        if self.max_length < source.max_length:
            log.info("data.max_length=%d exceeds the model's context; using %d", source.max_length, self.max_length)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_set: ListDataset | None = None
        self.val_set: ListDataset | None = None
        self.summary: dict[str, Any] = {}
        self._known: Pretokenized | None = None  # while setting up: the ids of every text read

    @property
    def evaluator(self):
        return self.source.evaluator

    def _read(self, loader: Callable[..., tuple[list, LoadReport]]) -> tuple[list, list]:
        src = self.source
        count_tokens = token_counter(self.tokenizer)
        train, report = loader(src.path, split=src.split, count_tokens=count_tokens, **src.options())
        val = None
        if src.validation_path is not None:
            val, val_report = loader(src.validation_path, split=src.validation_split, count_tokens=count_tokens,
                                     **src.options())
        self._check_chat_template(train + (val or []))
        # every text tokenized once, a batch at a time: the summary and the features use the same ids
        self._known = self._pretokenize(train + (val or []))
        self._note("train", report)
        self._profile(train, report)
        if val is not None:
            self._note("validation", val_report)
        else:
            train, val = src.hold_out(train)
            self.summary["validation/held_out_from_train"] = len(val)
        return train, val

    def _check_chat_template(self, examples: list) -> None:
        """Chat messages need the tokenizer's chat template to become text; a base model's tokenizer
        (gpt2, an encoder such as BERT) has none, which transformers reports with a traceback."""
        if getattr(self.tokenizer, "chat_template", None):
            return
        chat = next((e for e in examples if not isinstance(e.prompt, str)), None)
        if chat is not None:
            raise UserError(f"{chat.where}: the prompt is a list of chat messages, but the tokenizer "
                            f"({self.tokenizer.name_or_path}) has no chat template to write it with; use plain-text "
                            "prompts, or a tokenizer with a template (model.tokenizer=...)")

    def _pretokenize(self, examples: list) -> Pretokenized:
        texts = [prompt_contents(e.prompt) for e in examples]
        texts += [text for e in examples for text in responses(e)]
        return Pretokenized.of(self.tokenizer, texts, [e.prompt for e in examples if isinstance(e.prompt, str)])

    def _note(self, split: str, report: LoadReport) -> None:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items())) or "none"
        log.info("%s data %s: format %r detected, %d of %d rows kept (dropped: %s)",
                 split, report.source, report.format, report.kept, report.rows, dropped)
        self.summary.update({f"{split}/format": report.format, f"{split}/rows": report.rows,
                             f"{split}/kept": report.kept})
        self.summary.update({f"{split}/dropped_{k}": v for k, v in report.dropped.items()})
        self.summary.update({f"{split}/cleaned_{k}": v for k, v in report.cleaned.items()})
        self.summary.update({f"{split}/flagged_{k}": v for k, v in report.flagged.items()})

    def _profile(self, train: list, report: LoadReport) -> None:
        """The data report's headline figures of the training split (`lightrlhf.data.profile`), in the summary.
        Near-duplicate figures only for the MinHash steps that ran: measuring them is the report's job
        (`python -m lightrlhf.data report`), not every stage start's."""
        profile = DataProfile(self.kind, self._known.lookup(self.tokenizer))
        profile.add_all(train)
        clean = self.source.clean
        measured = [reason for reason, on in (("near_duplicate", clean.near_duplicates),
                                              ("near_identical_pair", clean.near_identical_pairs)) if on]
        result = profile.result(report, measured)
        self.summary.update(summary_scalars(result, "train"))
        for warning in result["warnings"]:
            log.warning("train data %s: %s", report.source, warning)

    def _tokenized(self, split: str, items: list, encode: Callable[[Any, TruncationReport], Any]) -> ListDataset:
        report = TruncationReport()
        features = [f for f in (encode(item, report) for item in items) if f is not None]
        if split == "validation":
            self._known = None  # both splits are encoded: the ids live on in the features only
        self.summary.update(report.as_dict(split))
        if report.counts:
            log.info("%s data: %s", split, ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items())))
        if split == "train" and not features:
            raise UserError(f"{self.source.path}: no training example fits in {self.max_length} tokens "
                            "(data.max_length, capped by the model's context)")
        return ListDataset(features)

    def _loader(self, dataset: ListDataset, collate: Callable, train: bool,
                lengths: Sequence[int] | None = None) -> StatefulDataLoader:
        """`lengths`: group training batches by these lengths (`length_grouped`)."""
        sampler = EpochShuffleSampler(len(dataset), self.seed, lengths, self.batch_size) if train else None
        return StatefulDataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                                  sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                                  drop_last=train and len(dataset) >= self.batch_size)

    def validation_prompts(self, n: int) -> list[tuple[list[int], str]]:
        """(prompt ids, prompt text) of the first `n` validation examples, for sampling."""
        return [(encode_prompt(self.tokenizer, ex.prompt), prompt_text(self.tokenizer, ex.prompt))
                for ex in self.val_examples[:n]]


class SFTDataModule(_SourceDataModule):
    """Prompt/completion (or chat) data for supervised fine-tuning. `packing`: training batches with
    several demonstrations per row (`pack_rows`), up to the data's max_length tokens a row."""

    kind = "sft"

    def __init__(self, source: DataSource, tokenizer, batch_size: int, eval_batch_size: int | None = 64,
                 num_workers: int = 0, seed: int = 0, packing: bool = False):
        super().__init__(source, tokenizer, batch_size, eval_batch_size, num_workers, seed)
        self.packing = packing

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, self.val_examples = self._read(load_sft)

        def encode(example, report):
            return encode_sft(self.tokenizer, example.prompt, example.completion, self.max_length,
                              self.max_prompt_length, report, self._known)

        self.train_set = self._tokenized("train", train, encode)
        self.val_set = self._tokenized("validation", self.val_examples, encode)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, collate_sft(self.tokenizer.pad_token_id,
                                                        self.max_length if self.packing else None), train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, collate_sft(self.tokenizer.pad_token_id), train=False)


class PreferenceDataModule(_SourceDataModule):
    """Preference pairs for reward modelling and DPO. `group_by_length`: training batches of pairs of
    similar length (`length_grouped`), which pads less."""

    kind = "preference"

    def __init__(self, source: DataSource, tokenizer, batch_size: int, eval_batch_size: int | None = 64,
                 num_workers: int = 0, seed: int = 0, *, group_by_length: bool):
        # group_by_length has no default: on for the reward model, off for DPO (conf/stage/*.yaml)
        super().__init__(source, tokenizer, batch_size, eval_batch_size, num_workers, seed)
        self.group_by_length = group_by_length

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        src = self.source

        def read(path, **kwargs):
            return load_preferences(path, margin_from_scores=src.margin_from_scores, **kwargs)

        train, self.val_examples = self._read(read)

        def encoder(examples):
            def encode(item, report):
                index, example = item
                features = encode_pair(self.tokenizer, example.prompt, example.chosen, example.rejected,
                                       example.margin, self.max_length, self.max_prompt_length, report,
                                       self._known)
                return None if features is None else replace(features, index=index)
            return encode

        self.train_set = self._tokenized("train", list(enumerate(train)), encoder(train))
        self.val_set = self._tokenized("validation", list(enumerate(self.val_examples)), encoder(self.val_examples))

    def train_dataloader(self) -> StatefulDataLoader:
        # a pair is padded to the longer of its two sequences (collate_pairs)
        lengths = ([max(len(f.chosen_ids), len(f.rejected_ids)) for f in self.train_set.items]
                   if self.group_by_length else None)
        return self._loader(self.train_set, collate_pairs(self.tokenizer.pad_token_id), train=True, lengths=lengths)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, collate_pairs(self.tokenizer.pad_token_id), train=False)


@dataclass(frozen=True)
class PromptFeatures:
    prompt_ids: list[int]
    prompt_text: str
    index: int


def collate_prompts(batch: list[PromptFeatures]) -> dict[str, Any]:
    """Prompts stay as id lists: the sampler left-pads them to the batch's own width."""
    return {"prompt_ids": [f.prompt_ids for f in batch], "prompt_text": [f.prompt_text for f in batch],
            "index": torch.tensor([f.index for f in batch])}


class PromptDataModule(_SourceDataModule):
    """Prompts for RL: the policy writes the responses. Validation prompts are for evaluation."""

    kind = "prompt"

    def __init__(self, source: DataSource, tokenizer, batch_size: int, eval_batch_size: int | None = 128,
                 num_workers: int = 0, seed: int = 0, max_eval_prompts: int | None = None):
        # batch_size (prompts per rollout) has no default: PPO (64) and GRPO (16 x k responses) differ
        super().__init__(source, tokenizer, batch_size, eval_batch_size, num_workers, seed)
        self.max_eval_prompts = max_eval_prompts

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, self.val_examples = self._read(load_prompts)
        if self.max_eval_prompts is not None:
            self.val_examples = self.val_examples[: self.max_eval_prompts]

        def encode(item, report):
            index, example = item
            report.examples += 1
            ids = fit_prompt(encode_prompt(self.tokenizer, example.prompt, self._known), self.max_prompt_length,
                             report)
            return PromptFeatures(ids, prompt_text(self.tokenizer, example.prompt), index)

        self.train_examples = train
        self.train_set = self._tokenized("train", list(enumerate(train)), encode)
        self.val_set = self._tokenized("validation", list(enumerate(self.val_examples)), encode)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, collate_prompts, train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, collate_prompts, train=False)
