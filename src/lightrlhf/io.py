"""Writing files so that a crash never leaves a half-written one behind.

Every file is written to a temporary name in the same directory, flushed to disk, then renamed
over the target (`os.replace` is atomic on POSIX), and the directory entry is synced. A reader sees
the old file or the new one, never a torn mix; a killed writer leaves only a `.tmp-*` file, which
the next writer ignores. Directories (exports) are built under a temporary name and renamed into
place the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lightrlhf.errors import UserError

TMP_PREFIX = ".tmp-"


class StorageError(UserError):
    """The disk refused a write (full, read-only, gone): one line, and nothing was replaced."""

    def __init__(self, path: str | Path, error: OSError):
        super().__init__(f"{path}: cannot write ({error.strerror or error}); nothing was replaced")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file and move it over `path` once it is complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as error:
        raise StorageError(path, error) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise StorageError(path, error) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` only if the block finishes.

    An existing `path` is moved aside first and deleted only after the new one is in place, so a
    crash at any point leaves either the old directory or the new one (plus a `.tmp-*` leftover).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    except OSError as error:
        raise StorageError(path, error) from None
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise StorageError(path, error) from None
        raise
    old = None
    if path.exists():
        old = path.with_name(TMP_PREFIX + path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(staging, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and check that files can be written in it (one-line error if not)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(prefix=TMP_PREFIX, dir=path, delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"{path}: cannot write the {what} there ({error.strerror or error})") from None
    return path
