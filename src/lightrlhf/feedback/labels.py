"""The label file: append-only JSON lines, and how to read them.

    {"id": "p17", "annotator": "ana", "choice": "a", "reason": "", "seconds": 4.2, "time": "2026-...Z"}
    {"undo": true, "annotator": "ana", "id": "p17", "time": "..."}

`choice` names the candidate's own sides ("a", "b"), or "tie", "both_bad", "skip". An undo record
retracts that annotator's latest label; nothing is ever rewritten, so the file is also the history.
`read_labels` gives the effective labels (undos applied); nothing else should parse the file. The
only writer is `lightrlhf.feedback.store.LabelStore`, which says how a line becomes durable.

A torn last line (a power cut mid-write: bytes with no final newline) belongs to a label nobody was
told was saved: readers skip it and say so (`LabelLog.torn`). A malformed complete line is an error
naming its line.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightrlhf.errors import DataError, UserError

log = logging.getLogger(__name__)

CHOICES = ("a", "b", "tie", "both_bad", "skip")
MAX_ANNOTATOR_CHARS = 64
MAX_REASON_CHARS = 4000


@dataclass(frozen=True)
class Label:
    id: str
    annotator: str
    choice: str
    reason: str = ""
    seconds: float = 0.0
    time: str = ""


class LabelRejected(UserError):
    """A label or undo the store refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LabelLog:
    """What a label file holds: the effective labels and what reading it met."""

    labels: list[Label]  # effective labels, in the order they were given
    records: int = 0  # complete lines read (labels and undos)
    undos: int = 0
    torn: str | None = None  # "labels.jsonl:41" when the last line was cut short by a crash


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_annotator(annotator: Any) -> str:
    if not isinstance(annotator, str) or not annotator.strip():
        raise LabelRejected('"annotator" must be a non-empty name')
    if len(annotator) > MAX_ANNOTATOR_CHARS or any(ord(c) < 32 for c in annotator):
        raise LabelRejected(f'"annotator" must be at most {MAX_ANNOTATOR_CHARS} printable characters')
    return annotator.strip()


def check_label(id: Any, annotator: Any, choice: Any, reason: Any = "", seconds: Any = 0.0) -> Label:
    """A label from untrusted values (a request body, a file line), or LabelRejected saying what is wrong."""
    if not isinstance(id, str) or not id:
        raise LabelRejected('"id" must be a non-empty string')
    annotator = check_annotator(annotator)
    if choice not in CHOICES:
        raise LabelRejected(f'"choice" must be one of {", ".join(CHOICES)}; got {json.dumps(choice)}')
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise LabelRejected(f'"reason" must be a string of at most {MAX_REASON_CHARS} characters')
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise LabelRejected(f'"seconds" must be a number >= 0; got {json.dumps(seconds)}')
    return Label(id, annotator, choice, reason, float(seconds))


class EffectiveLabels:
    """Labels with undos applied: per annotator, a stack in the order the labels were given."""

    def __init__(self) -> None:
        self.by_annotator: dict[str, list[tuple[int, Label]]] = {}
        self.records = self.undos = 0

    def apply(self, record: dict[str, Any], where: str, order: int) -> None:
        self.records += 1
        if record.get("undo") is True:
            annotator, id = record.get("annotator"), record.get("id")
            if not isinstance(annotator, str) or not isinstance(id, str):
                raise DataError(where, None, 'an undo record needs "annotator" and "id" strings')
            self.undos += 1
            stack = self.by_annotator.get(annotator, [])
            # the latest label of that id: the one the undo was written for
            for i in range(len(stack) - 1, -1, -1):
                if stack[i][1].id == id:
                    del stack[i]
                    break
            return
        try:
            label = check_label(record.get("id"), record.get("annotator"), record.get("choice"),
                                record.get("reason", ""), record.get("seconds", 0.0))
        except LabelRejected as problem:
            raise DataError(where, None, f"not a label record: {problem}") from None
        stack = self.by_annotator.setdefault(label.annotator, [])
        # a second label of the same pair (files merged by hand) replaces the first
        stack[:] = [entry for entry in stack if entry[1].id != label.id]
        stack.append((order, Label(**{**asdict(label), "time": str(record.get("time", ""))})))

    def latest(self, annotator: str) -> Label | None:
        stack = self.by_annotator.get(annotator)
        return stack[-1][1] if stack else None

    def ids(self, annotator: str) -> set[str]:
        return {label.id for _, label in self.by_annotator.get(annotator, [])}

    def has(self, annotator: str, id: str) -> bool:
        return any(label.id == id for _, label in self.by_annotator.get(annotator, []))

    def labels(self) -> list[Label]:
        return [label for _, label in sorted(e for stack in self.by_annotator.values() for e in stack)]


def _parse(line: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(where, None, f"invalid JSON ({str(error).split(':')[0]})") from None
    if not isinstance(record, dict):
        raise DataError(where, None, "expected a JSON object")
    return record


def apply_lines(state: EffectiveLabels, data: bytes, path: Path, first_line: int) -> tuple[int, int]:
    """Apply every complete line of `data`; returns (bytes consumed, lines consumed)."""
    consumed, number = 0, first_line
    while True:
        end = data.find(b"\n", consumed)
        if end < 0:
            return consumed, number - first_line
        line = data[consumed:end]
        if line.strip():
            state.apply(_parse(line, f"{path}:{number}"), f"{path}:{number}", number)
        consumed, number = end + 1, number + 1


def read_label_file(path: str | Path) -> LabelLog:
    """The effective labels of a label file, and whether its last line was torn (skipped, reported)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except OSError as error:
        raise DataError(path, None, f"cannot read the file ({error.strerror or error})") from None
    state = EffectiveLabels()
    consumed, lines = apply_lines(state, data, path, 1)
    torn = None
    if data[consumed:].strip():
        torn = f"{path}:{lines + 1}"
        log.warning("%s: the last line was cut short (a crash while writing); it is skipped", torn)
    return LabelLog(state.labels(), state.records, state.undos, torn)


def read_labels(path: str | Path) -> list[Label]:
    """The effective labels of a label file (undos applied), in the order they were given."""
    return read_label_file(path).labels
