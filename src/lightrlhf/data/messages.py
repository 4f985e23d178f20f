"""Chat messages in a data row: {role, content} and ShareGPT lists, HH-RLHF dialogues, and the
prompt that two responses share.

Every check raises `RowProblem` with what is wrong; the loader adds where (the file and line).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from lightrlhf.data.readers import json_type

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
# A raw prompt string (no chat template will be applied) or the conversation so far, ending with a
# user turn.
Prompt = str | list[Message]
ROLES = ("system", "user", "assistant")
MESSAGES = "a list of {role, content} messages"
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class RowProblem(Exception):
    """What is wrong with one row, without its location."""


class Drop(Exception):
    """A well-formed row that is of no use (`reason`: "tie", "empty_response", ...): it is dropped
    and counted, or in strict mode reported with `why`."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason, self.why = reason, why


def show(value: str, limit: int = 40) -> str:
    """A user's string quoted for a one-line message, cut to `limit` characters; an unpaired
    surrogate is written as its escape, so that the message can be printed."""
    value = value if len(value) <= limit else value[:limit] + "..."
    printable = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps(printable, ensure_ascii=False)


def text(value: str, field: str) -> str:
    """`value` if it can be encoded; JSON escapes like "\\ud800" give strings that cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problem = f"field {field} holds an unpaired surrogate (a \\ud800-style escape), not text"
        raise RowProblem(problem) from None
    return value


def as_messages(value: Any, field: str) -> list[Message]:
    """A validated message list: {role, content} items, or ShareGPT ones
    {from: human/gpt/system, value}, told apart by the first item."""
    if not isinstance(value, list):
        raise RowProblem(f"field {field} must be {MESSAGES}, got {json_type(value)}")
    if not value:
        raise RowProblem(f"field {field} is empty")
    sharegpt = isinstance(value[0], dict) and value[0].get("from") is not None
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = _SHAREGPT_ROLES if sharegpt else {role: role for role in ROLES}
    return [
        _message(item, f"{field}[{i}]", role_key, content_key, roles)
        for i, item in enumerate(value)
    ]


def _message(item: Any, at: str, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    if not isinstance(item, dict):
        wanted = f'an object with "{role_key}" and "{content_key}"'
        raise RowProblem(f"field {at} must be {wanted}, got {json_type(item)}")
    for key in (role_key, content_key):
        if item.get(key) is None:
            raise RowProblem(f'field {at}: message has no "{key}"')
    role, content = item[role_key], item[content_key]
    if not isinstance(role, str) or role not in roles:
        got = show(role) if isinstance(role, str) else json_type(role)
        raise RowProblem(f'field {at}: "{role_key}" must be one of {", ".join(roles)}, got {got}')
    if not isinstance(content, str):
        raise RowProblem(f'field {at}: "{content_key}" must be a string, got {json_type(content)}')
    return {"role": roles[role], "content": text(content, at)}


def as_prompt(value: str | list, field: str) -> Prompt:
    if isinstance(value, str):
        return text(value, field)
    return check_prompt(as_messages(value, field), field)


def split_reply(messages: list[Message], field: str) -> tuple[list[Message], str]:
    """(the conversation before the final assistant message, that message's text)."""
    role = messages[-1]["role"]
    if role != "assistant":
        problem = f'the final message must be from the assistant, got "{role}"'
        raise RowProblem(f"field {field}: {problem}")
    return messages[:-1], messages[-1]["content"]


def check_prompt(messages: list[Message], field: str) -> list[Message]:
    """`messages` if they can prompt a reply: not empty, ending with a user turn."""
    if not messages:
        problem = "there is no user message before the final assistant message"
        raise RowProblem(f"field {field}: {problem}")
    role = messages[-1]["role"]
    if role != "user":
        raise RowProblem(f'field {field}: the prompt must end with a user message, got "{role}"')
    return messages


def looks_like_hh(value: str) -> bool:
    return value.lstrip().startswith("Human:") and "\n\nAssistant:" in value


def parse_hh(value: str, field: str) -> list[Message]:
    """An Anthropic HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as
    messages, their contents stripped."""
    head, *turns = _HH_TURN.split("\n\n" + value.lstrip())
    if head.strip() or not turns:
        problem = 'is not an HH-RLHF dialogue: it must start with "\\n\\nHuman:"'
        raise RowProblem(f"field {field} {problem}")
    speakers, contents = turns[0::2], turns[1::2]
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(speakers, contents)
    ]


def shared_prompt_length(a: str, b: str) -> int:
    """Where the prompt that two responses start with ends: their longest common prefix, backed
    off so that no word is cut, and leaving each response at least one character.

    Backing off keeps a word that both responses begin with ("yes" / "yellow" share "ye") in the
    responses. A word is a run of letters and digits; a Chinese or Japanese character stands alone,
    as those scripts put no spaces between words."""
    n = min(len(os.path.commonprefix([a, b])), len(a) - 1, len(b) - 1)
    for k in range(n, 0, -1):
        if not (_in_word(a[k - 1]) and (_in_word(a[k]) or _in_word(b[k]))):
            return k
    return 0


def _in_word(char: str) -> bool:
    kana = "\u3040" <= char <= "\u30ff"
    han = "\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff" or char >= "\U00020000"
    return char.isalnum() and not (kana or han)
