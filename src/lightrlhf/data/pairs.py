"""Preference rows in each format, split into (prompt, chosen, rejected), and their margins.

Chosen and rejected become the text of their final assistant turn; what comes before it is the
prompt. A pair whose chosen and rejected continue different conversations is dropped
("prompt_mismatch"): it is not a comparison of two replies to one prompt.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lightrlhf.data.messages import (
    Drop,
    Message,
    Prompt,
    RowProblem,
    as_messages,
    as_prompt,
    check_prompt,
    parse_hh,
    shared_prompt_length,
    show,
    split_reply,
    text,
)
from lightrlhf.data.readers import json_type


def _implicit(values: dict[str, Any]) -> tuple[Prompt, str, str]:
    chosen, rejected = text(values["chosen"], '"chosen"'), text(values["rejected"], '"rejected"')
    cut = shared_prompt_length(chosen, rejected)
    if not chosen[:cut].strip():
        raise RowProblem(
            'chosen and rejected share no prompt prefix (format "implicit" needs both to start '
            "with the prompt)"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _from_conversations(
    chosen: list[Message], rejected: list[Message], given: list[Message] | None
) -> tuple[Prompt, str, str]:
    """Split two conversations into the prompt they share and their final assistant replies.

    `given` is a separate "prompt" field: it may be repeated at the start of the conversations
    (as in UltraFeedback) or be continued by them (as in TRL's conversational format)."""
    before, chosen_reply = split_reply(chosen, '"chosen"')
    before_rejected, rejected_reply = split_reply(rejected, '"rejected"')
    if before != before_rejected:
        raise Drop("prompt_mismatch", "chosen and rejected continue different conversations")
    if given is not None and before[: len(given)] != given:
        if before and before[0]["role"] != "assistant":
            raise RowProblem(
                'field "chosen" holds a conversation that does not start with the prompt'
            )
        before = given + before
    return check_prompt(before, '"chosen"'), chosen_reply, rejected_reply


def _explicit(values: dict[str, Any]) -> tuple[Prompt, str, str]:
    chosen, rejected = text(values["chosen"], '"chosen"'), text(values["rejected"], '"rejected"')
    return as_prompt(values["prompt"], '"prompt"'), chosen, rejected


def _messages_pair(
    parse: Callable[[Any, str], list[Message]],
    given: Callable[[dict[str, Any]], list[Message] | None],
) -> Callable[[dict[str, Any]], tuple[Prompt, str, str]]:
    """A converter for pairs given as two conversations, read by `parse`; `given` reads the
    row's separate prompt, if the format has one."""

    def pair(values: dict[str, Any]) -> tuple[Prompt, str, str]:
        chosen = parse(values["chosen"], '"chosen"')
        rejected = parse(values["rejected"], '"rejected"')
        return _from_conversations(chosen, rejected, given(values))

    return pair


PAIRS: dict[str, Callable[[dict[str, Any]], tuple[Prompt, str, str]]] = {
    "explicit": _explicit,
    # UltraFeedback's prompt is a string; as messages it is one user turn
    "ultrafeedback": _messages_pair(
        as_messages, lambda v: [{"role": "user", "content": text(v["prompt"], '"prompt"')}]
    ),
    "conversational": _messages_pair(
        as_messages,
        lambda v: None if v.get("prompt") is None else as_messages(v["prompt"], '"prompt"'),
    ),
    "hh_rlhf": _messages_pair(parse_hh, lambda v: None),
    "implicit": _implicit,
}


def read_margin(values: dict[str, Any], from_scores: bool) -> float | None:
    """score_chosen - score_rejected (both required) if `from_scores`, else the optional
    "margin" field."""
    if not from_scores:
        return _number(values, "margin", "")
    need = " (margin_from_scores needs it)"
    difference = _number(values, "score_chosen", need) - _number(values, "score_rejected", need)
    if not math.isfinite(difference):
        raise RowProblem("score_chosen - score_rejected is not a finite number")
    return difference


def _number(values: dict[str, Any], name: str, required: str) -> float | None:
    """The finite number in field `name`; None if absent, unless `required` says why it is
    needed."""
    value = values.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowProblem(f'field "{name}" is missing{required}')
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowProblem(f'field "{name}" must be a number, got {json_type(value)}')
    try:
        number = float(value)
    except ValueError:
        raise RowProblem(f'field "{name}" must be a number, got {show(value)}') from None
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if not math.isfinite(number):
        got = show(value) if isinstance(value, str) else "a number out of range"
        raise RowProblem(f'field "{name}" must be a finite number, got {got}')
    return number
