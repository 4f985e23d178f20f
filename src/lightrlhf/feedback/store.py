"""The one writer of a label file: durable appends, safely shared by threads and processes.

How a label is made durable (`LabelStore.append`):
  1. take the file lock (`fcntl.flock`, exclusive; plus a thread lock, as flock does not exclude two
     threads sharing one open file),
  2. read whatever other writers appended since this store last looked (so "already labelled" is
     decided on the whole file, not on one process's memory),
  3. write the whole line with one `write` on an O_APPEND descriptor, then `fsync`,
  4. release the lock; only then does the caller answer the page.
A line is therefore on disk before anyone is told it is saved, and writers never interleave. A
write the disk refuses is rolled back to the previous length, so no half line is left behind.

A torn last line left by a crash is moved to `<file>.torn` and cut off when a store opens the file
(or meets it under the lock), so the next label starts on a line of its own.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightrlhf.errors import UserError
from lightrlhf.feedback.labels import (
    EffectiveLabels,
    Label,
    LabelRejected,
    apply_lines,
    check_annotator,
    check_label,
    utc_now,
)
from lightrlhf.io import StorageError

log = logging.getLogger(__name__)


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
        self._state = EffectiveLabels()
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
        consumed, lines = apply_lines(self._state, data, self.path, position.line)
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
