"""The label file: append-only JSON lines that a crash, a kill or a second writer cannot damage.

    {"id": "p17", "annotator": "ana", "choice": "a", "reason": "", "seconds": 4.2, "time": "2026-...Z"}
    {"undo": true, "annotator": "ana", "id": "p17", "time": "..."}

`choice` names the candidate's own sides ("a", "b"), or "tie", "both_bad", "skip". An undo record
retracts that annotator's latest label; nothing is ever rewritten, so the file is also the history.
`read_labels` gives the effective labels (undos applied); nothing else should parse the file.

How a label is made durable (`LabelStore.append`):
  1. take the file lock (`fcntl.flock`, exclusive; plus a thread lock, as flock does not exclude two
     threads sharing one open file),
  2. read whatever other writers appended since this store last looked (so "already labelled" is
     decided on the whole file, not on one process's memory),
  3. write the whole line with one `write` on an O_APPEND descriptor, then `fsync`,
  4. release the lock; only then does the caller answer the page.
A line is therefore on disk before anyone is told it is saved, and writers never interleave. A
write the disk refuses is rolled back to the previous length, so no half line is left behind.

A torn last line (a power cut mid-write: bytes with no final newline) belongs to a label nobody was
told was saved. Readers skip it and say so (`LabelLog.torn`); a store opening the file moves the
fragment to `<file>.torn` and cuts it off, so the next label starts on a line of its own.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightrlhf.errors import DataError, UserError
from lightrlhf.io import StorageError

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


class _Effective:
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


def _feed(state: _Effective, data: bytes, path: Path, first_line: int) -> tuple[int, int]:
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
    state = _Effective()
    consumed, lines = _feed(state, data, path, 1)
    torn = None
    if data[consumed:].strip():
        torn = f"{path}:{lines + 1}"
        log.warning("%s: the last line was cut short (a crash while writing); it is skipped", torn)
    return LabelLog(state.labels(), state.records, state.undos, torn)


def read_labels(path: str | Path) -> list[Label]:
    """The effective labels of a label file (undos applied), in the order they were given."""
    return read_label_file(path).labels


@dataclass
class _Position:
    offset: int = 0  # bytes of the file already applied
    line: int = 1  # number of the next line
    torn_saved: list[str] = field(default_factory=list)  # messages about fragments moved aside


class LabelStore:
    """Appends labels to one file, safely shared by threads and processes (see the module docstring).

    `known_ids`: when given, a label for any other id is refused (404)."""

    def __init__(self, path: str | Path, known_ids: Collection[str] | None = None) -> None:
        self.path = Path(path)
        self.known_ids = set(known_ids) if known_ids is not None else None
        self._thread_lock = threading.Lock()
        self._state = _Effective()
        self._position = _Position()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            try:
                self._fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:  # a new folder for a new label file
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            raise UserError(f"{self.path}: cannot write the labels there ({error.strerror or error})") from None
        try:
            with self._locked():
                pass  # reads what is there and moves a torn last line aside
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def notes(self) -> list[str]:
        """What opening the file had to repair (torn fragments moved aside), for the user to read."""
        return list(self._position.torn_saved)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    def labelled_ids(self, annotator: str) -> set[str]:
        with self._thread_lock:
            self._catch_up(locked=False)
            return self._state.ids(annotator)

    def labels(self) -> list[Label]:
        with self._thread_lock:
            self._catch_up(locked=False)
            return self._state.labels()

    # -- writing -----------------------------------------------------------------------------
    def append(self, id: str, annotator: str, choice: str, reason: str = "", seconds: float = 0.0) -> Label:
        """Write one label durably; LabelRejected (404 unknown id, 409 already labelled, 400 invalid)."""
        label = check_label(id, annotator, choice, reason, seconds)
        if self.known_ids is not None and label.id not in self.known_ids:
            raise LabelRejected(f'unknown candidate id "{label.id}"', status=404)
        label = Label(**{**asdict(label), "time": utc_now()})
        with self._locked():
            if self._state.has(label.annotator, label.id):
                raise LabelRejected(f'"{label.annotator}" has already labelled "{label.id}" (undo it first to '
                                    "change the label)", status=409)
            self._write(asdict(label))
        return label

    def undo(self, annotator: str) -> str | None:
        """Retract this annotator's latest label; returns its id, or None when there is nothing to undo."""
        annotator = check_annotator(annotator)
        with self._locked():
            latest = self._state.latest(annotator)
            if latest is None:
                return None
            self._write({"undo": True, "annotator": annotator, "id": latest.id, "time": utc_now()})
            return latest.id

    # -- internals ---------------------------------------------------------------------------
    class _Lock:
        def __init__(self, store: LabelStore) -> None:
            self.store = store

        def __enter__(self) -> None:
            self.store._thread_lock.acquire()
            try:
                fcntl.flock(self.store._fd, fcntl.LOCK_EX)
                self.store._catch_up(locked=True)
            except BaseException:
                fcntl.flock(self.store._fd, fcntl.LOCK_UN)
                self.store._thread_lock.release()
                raise

        def __exit__(self, *exc: object) -> None:
            fcntl.flock(self.store._fd, fcntl.LOCK_UN)
            self.store._thread_lock.release()

    def _locked(self) -> LabelStore._Lock:
        return LabelStore._Lock(self)

    def _catch_up(self, locked: bool) -> None:
        """Apply the lines other writers appended. Without the file lock a line may still be being
        written, so only complete lines are taken; with it, an incomplete tail is a torn line."""
        size = os.fstat(self._fd).st_size
        position = self._position
        if size == position.offset:
            return
        if size < position.offset:
            raise UserError(f"{self.path}: the label file shrank while being served (was it replaced?); "
                            "restart the server")
        with open(self.path, "rb") as file:
            file.seek(position.offset)
            data = file.read(size - position.offset)
        consumed, lines = _feed(self._state, data, self.path, position.line)
        position.offset += consumed
        position.line += lines
        if locked and consumed < len(data):
            self._move_torn_tail(data[consumed:])

    def _move_torn_tail(self, fragment: bytes) -> None:
        where = f"{self.path}:{self._position.line}"
        aside = self.path.with_name(self.path.name + ".torn")
        if fragment.strip():
            try:
                with open(aside, "ab") as file:
                    file.write(fragment + b"\n")
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as error:
                raise StorageError(aside, error) from None
        os.ftruncate(self._fd, self._position.offset)
        os.fsync(self._fd)
        message = f"{where}: the last line was cut short by a crash (a label never confirmed); moved to {aside}"
        self._position.torn_saved.append(message)
        log.warning(message)

    def _write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        before = self._position.offset
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as error:
            try:  # leave no half line behind: the label was not saved and the page will say so
                os.ftruncate(self._fd, before)
                os.fsync(self._fd)
            except OSError:
                pass
            raise LabelRejected(f"{self.path}: cannot save the label ({error.strerror or error}); every earlier "
                                "label is kept", status=507) from None
        self._state.apply(record, f"{self.path}:{self._position.line}", self._position.line)
        self._position.offset += len(data)
        self._position.line += 1
