"""Writing files so that a crash never leaves a half-written one behind.

Every file is written to a temporary name in the same directory, flushed to disk, then renamed
over the target (`os.replace` is atomic on POSIX), and the directory entry is synced. A reader sees
the old file or the new one, never a torn mix; a killed writer leaves only a `.tmp-*` file, which
the next writer ignores. Directories (exports) are built under a temporary name and renamed into
place the same way.

A write the disk refuses (full, read-only, not permitted, a file-size limit) is a `StorageError`:
one line naming the file, the previous version left in place, the temporary one removed. Libraries
do not always say so with an `OSError`: `torch.save` turns a failed write into a `RuntimeError` of its
own (`[enforce fail at inline_container.cc] unexpected pos ...`) and safetensors into a
`SafetensorError` (`I/O error: No space left on device (os error 28)`); `write_failure` finds the
`OSError` behind them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lightrlhf.errors import UserError

TMP_PREFIX = ".tmp-"


class StorageError(UserError):
    """The disk refused a write (full, read-only, gone): one line, and nothing was replaced."""

    def __init__(self, path: str | Path, error: OSError):
        super().__init__(f"{path}: cannot write ({error.strerror or error}); nothing was replaced")


class _WatchedFile:
    """The file handed to a writer: it remembers the `OSError` a write raised, which a library that
    writes through it (torch.save) may report as an error of its own."""

    def __init__(self, file: BinaryIO):
        self._file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


# how a library's message names the OSError it wraps: Rust's `(os error 28)` or `Os { code: 28, .. }`
_OS_CODE = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")


def write_failure(error: BaseException, recorded: OSError | None = None) -> OSError | None:
    """The `OSError` behind a failed write, or None when the failure was not the disk's (a bug, Ctrl-C):
    the error itself, one a write through our file raised (`recorded`), one in its chain of causes,
    or one a library names in its message."""
    if not isinstance(error, Exception):
        return None
    if isinstance(error, OSError):
        return error
    if recorded is not None:
        return recorded
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        match = _OS_CODE.search(str(seen))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


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
    watched = None
    try:
        with os.fdopen(fd, "wb") as f:
            watched = _WatchedFile(f)
            write(watched)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = write_failure(error, watched.error if watched is not None else None)
        if cause is not None:
            raise StorageError(path, cause) from None
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
        cause = write_failure(error)
        if cause is not None:
            raise StorageError(path, cause) from None
        raise
    old = None
    try:
        if path.exists():
            old = path.with_name(TMP_PREFIX + path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(staging, path)
    except OSError as error:
        if old is not None and not path.exists():
            os.replace(old, path)  # the previous one goes back
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageError(path, error) from None
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
