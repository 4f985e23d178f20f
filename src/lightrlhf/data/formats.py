"""The data formats researchers already have, recognised and normalised to typed examples.

Three kinds of data: SFT (prompt -> completion), preference pairs (prompt, chosen, rejected) and
prompts alone (for RL). A completion, chosen or rejected response is always the text of the final
assistant turn; everything before it is the prompt: a raw string (no chat template will be applied)
or the conversation so far as messages, ending with a user turn.

The format is detected from the first row's fields (the first format in `FORMATS[kind]` that fits);
every later row must fit the same format, as must every row when `format=` names one. Rows that are
well formed but useless are dropped and counted in `LoadReport.dropped`, never silently:
  tie              chosen == rejected after normalisation
  empty_response   an empty or whitespace-only completion, chosen or rejected
  empty_prompt     (prompts only) an empty or whitespace-only prompt
  prompt_mismatch  chosen and rejected continue different conversations
and, with cleaning (`lightrlhf.data.clean`, the `data.clean` node), after the text is normalised:
  duplicate, near_duplicate, near_identical_pair, prompt_too_long, response_too_long, response_too_short
With strict=True the first such row is an error instead.

Decisions: "implicit" pairs whose responses share no prompt prefix are an error (the file is most
likely not in that format), not an empty prompt. Numeric fields (margin, score_chosen,
score_rejected) also accept numeric strings, as CSV has no other kind, and an empty one is absent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from lightrlhf.data.clean import Cleaner, CleaningSpec, CountTokens
from lightrlhf.data.messages import (
    MESSAGES,
    Drop,
    Message,
    Prompt,
    RowProblem,
    as_messages,
    as_prompt,
    check_prompt,
    looks_like_hh,
    show,
    split_reply,
    text,
)
from lightrlhf.data.pairs import PAIRS, read_margin
from lightrlhf.data.readers import MAX_LINE_BYTES, Row, iter_rows, json_type
from lightrlhf.errors import DataError, UserError

__all__ = ["FORMATS", "LoadReport", "Message", "PreferenceExample", "Prompt", "PromptExample",
           "SFTExample", "load_preferences", "load_prompts", "load_sft", "stream_examples"]


@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt
    completion: str
    where: str
    annotator: str | None = None  # the row's annotator id, when it has one (data report)
    label: str | None = None  # the row's own "label" field, when it has one (data report)


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None
    where: str
    annotator: str | None = None  # the row's annotator id, when it has one (data report)
    label: str | None = None  # the row's own "label" field, when it has one (data report)


@dataclass(frozen=True)
class PromptExample:
    prompt: Prompt
    where: str


@dataclass
class LoadReport:
    source: str
    format: str
    rows: int
    kept: int
    dropped: dict[str, int]  # reason -> count, e.g. {"tie": 3, "duplicate": 2}
    cleaned: dict[str, int] = field(default_factory=dict)  # text step -> rows it changed, e.g. {"unicode": 4}
    flagged: dict[str, int] = field(default_factory=dict)  # a switched-off step -> rows it would drop


TEXT, EITHER = "a string", f"a string or {MESSAGES}"
# The fields each format needs and their types; "name?" is optional, "a|b" takes the first present.
_PREFERENCE_SHAPES = {
    "explicit": {"prompt": EITHER, "chosen": TEXT, "rejected": TEXT},
    "ultrafeedback": {"prompt": TEXT, "chosen": MESSAGES, "rejected": MESSAGES},
    "conversational": {"prompt?": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES},
    "hh_rlhf": {"chosen": TEXT, "rejected": TEXT},
    "implicit": {"chosen": TEXT, "rejected": TEXT},
}
_SHAPES = {
    "sft": {
        "prompt_completion": {"prompt": EITHER, "completion": EITHER},
        "messages": {"messages|conversations": MESSAGES},
        "alpaca": {"instruction": TEXT, "input?": TEXT, "output": TEXT},
    },
    "preference": _PREFERENCE_SHAPES,
    "prompt": {
        **_PREFERENCE_SHAPES,
        "prompt": {"prompt": EITHER},
        "messages": {"messages|conversations": MESSAGES},
        "alpaca": {"instruction": TEXT, "input?": TEXT},
    },
}
_TYPES = {TEXT: str, MESSAGES: list, EITHER: (str, list)}
# kind -> its formats, in the order auto-detection tries them
FORMATS: dict[str, tuple[str, ...]] = {kind: tuple(shapes) for kind, shapes in _SHAPES.items()}


class _Missing(RowProblem):
    """Fields the format needs are absent (or null): the row is not in that format at all."""

    def __init__(self, message: str, missing: int, needed: int) -> None:
        super().__init__(message)
        self.missing, self.needed = missing, needed


def load_sft(
    source: str, format: str = "auto", split: str | None = None, strict: bool = False,
    clean: CleaningSpec | None = None, max_line_bytes: int = MAX_LINE_BYTES, count_tokens: CountTokens | None = None,
    measure_all: bool = False,
) -> tuple[list[SFTExample], LoadReport]:
    """clean: the cleaning steps (`lightrlhf.data.clean`); None = none. count_tokens: for its token limits.
    measure_all: see `stream_examples`."""
    return _collect(stream_examples("sft", source, format=format, split=split, strict=strict, clean=clean,
                                    max_line_bytes=max_line_bytes, count_tokens=count_tokens, measure_all=measure_all))


def load_preferences(
    source: str, format: str = "auto", split: str | None = None, strict: bool = False,
    clean: CleaningSpec | None = None, margin_from_scores: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
    count_tokens: CountTokens | None = None, measure_all: bool = False,
) -> tuple[list[PreferenceExample], LoadReport]:
    """margin_from_scores: margin = score_chosen - score_rejected (both required); otherwise the
    optional "margin" field."""
    return _collect(stream_examples("preference", source, format=format, split=split, strict=strict, clean=clean,
                                    margin_from_scores=margin_from_scores, max_line_bytes=max_line_bytes,
                                    count_tokens=count_tokens, measure_all=measure_all))


def load_prompts(
    source: str, format: str = "auto", split: str | None = None, strict: bool = False,
    clean: CleaningSpec | None = None, max_line_bytes: int = MAX_LINE_BYTES, count_tokens: CountTokens | None = None,
    measure_all: bool = False,
) -> tuple[list[PromptExample], LoadReport]:
    """Also reads SFT and preference files (their prompts), so one file can serve several stages."""
    return _collect(stream_examples("prompt", source, format=format, split=split, strict=strict, clean=clean,
                                    max_line_bytes=max_line_bytes, count_tokens=count_tokens, measure_all=measure_all))


Example = TypeVar("Example", SFTExample, PreferenceExample, PromptExample)


def _collect(stream: tuple[Iterator[Example], LoadReport]) -> tuple[list[Example], LoadReport]:
    examples, report = stream
    return list(examples), report


def stream_examples(
    kind: str, source: str, *, format: str = "auto", split: str | None = None, strict: bool = False,
    clean: CleaningSpec | None = None, margin_from_scores: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
    count_tokens: CountTokens | None = None, measure_all: bool = False,
) -> tuple[Iterator[Example], LoadReport]:
    """The examples of `kind` in `source`, one at a time, and the LoadReport they fill in as they are
    read (complete once the iterator is exhausted). Nothing is held but the row being read and what
    the cleaning steps keep (see `lightrlhf.data.clean`). An empty result is an error, raised at the end.

    measure_all: also count what switched-off cleaning steps would drop (`LoadReport.flagged`)."""
    if format != "auto" and format not in FORMATS[kind]:
        known = ", ".join(FORMATS[kind])
        raise UserError(f'unknown {kind} format "{format}"; known: auto, {known}')
    if clean is not None and clean.token_limits and count_tokens is None:
        raise UserError("data.clean: the token limits need the model's tokenizer to count tokens")
    report = LoadReport(source, format, 0, 0, {})
    cleaner = Cleaner(clean, count_tokens, measure_all, strict) if clean is not None else None
    dropped, cleaned, flagged = Counter(), Counter(), Counter()

    def reject(where: str, drop: Drop) -> None:
        if strict:
            raise DataError(where, None, f"{drop.why}; strict mode does not drop it") from None
        dropped[drop.reason] += 1

    def rows() -> Iterator[Example]:
        for row in iter_rows(source, split, max_line_bytes):  # one row in memory at a time
            report.rows += 1
            try:
                if report.format == "auto":  # the first row decides the format of the file
                    report.format = _detect(kind, row.values)
                else:
                    _check_shape(row.values, _SHAPES[kind][report.format])
                example = _BUILD[kind](report.format, row, margin_from_scores)
                if cleaner is not None:
                    example = cleaner.normalize(example, cleaned)
                _CHECK[kind](example)
                if cleaner is not None:
                    cleaner.check_duplicate(example, flagged)
            except RowProblem as problem:
                raise DataError(row.where, None, str(problem)) from None
            except Drop as drop:
                reject(row.where, drop)
                continue
            yield example

    def examples() -> Iterator[Example]:
        stream = rows()
        if cleaner is not None:
            stream = cleaner.filter(stream, lambda example, drop: reject(example.where, drop), flagged)
        for example in stream:
            report.kept += 1
            yield example
        report.dropped, report.cleaned, report.flagged = dict(dropped), dict(cleaned), dict(flagged)
        if not report.kept:
            counts = ", ".join(f"{reason}: {n}" for reason, n in dropped.most_common())
            raise UserError(f"{source}: all {report.rows} rows were dropped ({counts})")

    return examples(), report


def detect_kind(source: str, split: str | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> str:
    """The kind whose formats fit the first row of `source`: preference, then sft, then prompt."""
    row = next(iter_rows(source, split, max_line_bytes))
    for kind in ("preference", "sft", "prompt"):
        try:
            _detect(kind, row.values)
            return kind
        except RowProblem:
            continue
    formats = ", ".join(dict.fromkeys(f for names in FORMATS.values() for f in names))
    raise DataError(row.where, None, f"fits none of the formats ({formats})")


_ANNOTATOR_FIELDS = ("annotator", "annotator_id", "worker_id", "rater_id", "labeler")


def _tags(values: dict[str, Any]) -> dict[str, str | None]:
    """The row's annotator id and its own label field, when it has them (for the data report)."""
    annotator = next((values[k] for k in _ANNOTATOR_FIELDS if values.get(k) not in (None, "")), None)
    label = values.get("label")
    return {"annotator": None if annotator is None else str(annotator),
            "label": None if label is None or isinstance(label, (dict, list)) else str(label)}


def _build_sft(fmt: str, row: Row, margin_from_scores: bool) -> SFTExample:
    prompt, completion = _SFT[fmt](row.values)
    return SFTExample(prompt, completion, row.where, **_tags(row.values))


def _build_preference(fmt: str, row: Row, margin_from_scores: bool) -> PreferenceExample:
    prompt, chosen, rejected = PAIRS[fmt](row.values)
    margin = read_margin(row.values, margin_from_scores)
    return PreferenceExample(prompt, chosen, rejected, margin, row.where, **_tags(row.values))


def _build_prompt(fmt: str, row: Row, margin_from_scores: bool) -> PromptExample:
    prompt = PAIRS[fmt](row.values)[0] if fmt in PAIRS else _PROMPTS[fmt](row.values)
    return PromptExample(prompt, row.where)


def _check_sft(example: SFTExample) -> None:
    if not example.completion.strip():
        raise Drop("empty_response", "the completion is empty")


def _check_preference(example: PreferenceExample) -> None:
    if example.chosen == example.rejected:
        raise Drop("tie", "chosen and rejected are identical (a tie)")
    for name, response in (("chosen", example.chosen), ("rejected", example.rejected)):
        if not response.strip():
            raise Drop("empty_response", f"the {name} response is empty")


def _check_prompt(example: PromptExample) -> None:
    prompt = example.prompt
    contents = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    if not any(content.strip() for content in contents):
        raise Drop("empty_prompt", "the prompt is empty")


_BUILD: dict[str, Callable[[str, Row, bool], Any]] = {
    "sft": _build_sft, "preference": _build_preference, "prompt": _build_prompt}
_CHECK: dict[str, Callable[[Any], None]] = {"sft": _check_sft, "preference": _check_preference, "prompt": _check_prompt}


def _detect(kind: str, values: dict[str, Any]) -> str:
    """The first format of `kind` that the row fits.

    If none fits, the message is about the format the row comes closest to: where some have all
    their fields, the first field whose type fits none of them (with every type they allow for it);
    where one lacks a single field, that field; otherwise which fields each format needs."""
    near, one_short = [], None
    for name, shape in _SHAPES[kind].items():
        try:
            _check_shape(values, shape)
        except _Missing as missing:
            if missing.missing == 1 < missing.needed:
                one_short = one_short or missing
            continue
        except RowProblem as problem:
            near.append((shape, problem))
            continue
        if name != "hh_rlhf" or looks_like_hh(values["chosen"]):
            return name
    if near:
        allowed: dict[str, set[str]] = {}
        for shape, _ in near:
            for spec, wanted in shape.items():
                allowed.setdefault(spec.rstrip("?"), set()).add(wanted)
        for spec, types in allowed.items():
            _check_shape(values, {spec + "?": types.pop() if len(types) == 1 else EITHER})
        raise near[0][1]
    if one_short is not None:
        raise one_short
    found = ", ".join(show(key) for key in list(values)[:8]) or "(none)"
    wanted = ", ".join(f"{name} {{{', '.join(shape)}}}" for name, shape in _SHAPES[kind].items())
    raise RowProblem(f"cannot tell the {kind} format from the fields {found}; formats: {wanted}")


def _check_shape(values: dict[str, Any], shape: dict[str, str]) -> None:
    present = {}  # spec -> the name it is present under
    for spec in shape:
        names = spec.rstrip("?").split("|")
        present[spec] = next((n for n in names if values.get(n) is not None), names[0])
    needed = [spec for spec in shape if not spec.endswith("?")]
    missing = [present[spec] for spec in needed if values.get(present[spec]) is None]
    if missing:
        name = missing[0]
        message = f'field "{name}" is {"null" if name in values else "missing"}'
        raise _Missing(message, len(missing), len(needed))
    for spec, wanted in shape.items():
        value = values.get(present[spec])
        if value is not None and not isinstance(value, _TYPES[wanted]):
            raise RowProblem(f'field "{present[spec]}" must be {wanted}, got {json_type(value)}')


def _messages_field(values: dict[str, Any]) -> tuple[list[Message], str]:
    name = "messages" if values.get("messages") is not None else "conversations"
    return as_messages(values[name], f'"{name}"'), f'"{name}"'


def _alpaca_prompt(values: dict[str, Any]) -> str:
    instruction, extra = text(values["instruction"], '"instruction"'), values.get("input")
    return instruction + "\n\n" + text(extra, '"input"') if extra and extra.strip() else instruction


def _completion(value: str | list) -> str:
    if isinstance(value, str):
        return text(value, '"completion"')
    messages = as_messages(value, '"completion"')
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowProblem('field "completion" must be a string or a list of one assistant message')
    return messages[0]["content"]


def _sft_messages(values: dict[str, Any]) -> tuple[Prompt, str]:
    messages, field = _messages_field(values)
    before, reply = split_reply(messages, field)
    return check_prompt(before, field), reply


def _prompt_messages(values: dict[str, Any]) -> Prompt:
    messages, field = _messages_field(values)
    return check_prompt(messages[:-1] if messages[-1]["role"] == "assistant" else messages, field)


_SFT: dict[str, Callable[[dict[str, Any]], tuple[Prompt, str]]] = {
    "prompt_completion": lambda v: (
        as_prompt(v["prompt"], '"prompt"'), _completion(v["completion"])
    ),
    "messages": _sft_messages,
    "alpaca": lambda v: (_alpaca_prompt(v), text(v["output"], '"output"')),
}
_PROMPTS: dict[str, Callable[[dict[str, Any]], Prompt]] = {
    "prompt": lambda v: as_prompt(v["prompt"], '"prompt"'),
    "messages": _prompt_messages,
    "alpaca": _alpaca_prompt,
}
