"""Atomic file and directory writes: a failed writer leaves the old version and no temporary files."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from lightrlhf.errors import UserError
from lightrlhf.io import (
    TMP_PREFIX,
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    ensure_writable_dir,
)


class WriterFailed(Exception):
    pass


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_creates_missing_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(path, "x")
    assert path.read_text() == "x"


@pytest.mark.parametrize("error", [WriterFailed("disk full"), KeyboardInterrupt()])
def test_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / "state.json"
    path.write_text("old")

    def write(f):
        f.write(b"half of the new cont")
        f.flush()
        assert any(name.startswith(TMP_PREFIX + "state.json.") for name in os.listdir(tmp_path))
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_failing_writer_on_a_new_path_leaves_no_file(tmp_path):
    def write(f):
        raise WriterFailed

    with pytest.raises(WriterFailed):
        atomic_write(tmp_path / "new.bin", write)
    assert os.listdir(tmp_path) == []


def test_atomic_directory_replaces_the_old_one_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(TMP_PREFIX + "export.")
        (staging / "new.txt").write_text("new")
        assert sorted(os.listdir(target)) == ["old.txt"]  # not yet replaced
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["export"]  # neither staging nor the moved-aside old copy remain


def test_atomic_directory_creates_a_new_directory(tmp_path):
    target = tmp_path / "nested" / "export"
    with atomic_directory(target) as staging:
        (staging / "f").write_text("1")
    assert os.listdir(target) == ["f"]
    assert os.listdir(tmp_path / "nested") == ["export"]


def test_failing_block_keeps_the_old_directory_and_removes_staging(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(WriterFailed):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("partial")
            raise WriterFailed
    assert not staging.exists()
    assert os.listdir(target) == ["old.txt"] and (target / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["export"]


def test_failing_block_on_a_new_path_leaves_nothing(tmp_path):
    with pytest.raises(WriterFailed):
        with atomic_directory(tmp_path / "export"):
            raise WriterFailed
    assert os.listdir(tmp_path) == []


def test_ensure_writable_dir_creates_the_directory_and_leaves_no_probe(tmp_path):
    path = ensure_writable_dir(tmp_path / "runs" / "a", "output directory")
    assert path == tmp_path / "runs" / "a" and path.is_dir()
    assert os.listdir(path) == []
    assert ensure_writable_dir(str(path), "output directory") == path  # an existing directory is fine


def _as_unprivileged_user(fn) -> str:
    """Run `fn` in a forked child that has dropped root to `nobody`; return what it returned (or raised)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                result = f"returned {fn()}"
            except UserError as error:
                result = f"UserError: {error}"
        except BaseException as error:  # report anything, so that the parent can fail with it
            result = f"{type(error).__name__}: {error}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def test_ensure_writable_dir_read_only_directory(tmp_path):
    # root writes through a read-only mode; as root, the check runs in a child that dropped to `nobody`,
    # under a parent directory that `nobody` may enter
    parent = Path(tempfile.mkdtemp(prefix="lightrlhf-readonly-"))
    parent.chmod(0o755)
    path = parent / "locked"
    path.mkdir()
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        expected = f"{path}: cannot write the checkpoint directory there (Permission denied)"
        if os.access(path, os.W_OK):
            assert _as_unprivileged_user(lambda: ensure_writable_dir(path, "checkpoint directory")) == \
                f"UserError: {expected}"
        else:
            with pytest.raises(UserError) as info:
                ensure_writable_dir(path, "checkpoint directory")
            assert str(info.value) == expected
        assert os.listdir(path) == []
    finally:
        path.chmod(stat.S_IRWXU)
        shutil.rmtree(parent)


def test_ensure_writable_dir_path_under_a_file(tmp_path):
    # fails for every user, root included: a regular file cannot hold a directory
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = blocker / "runs"
    with pytest.raises(UserError) as info:
        ensure_writable_dir(path, "output directory")
    message = str(info.value)
    assert message == f"{path}: cannot write the output directory there (Not a directory)"
    assert "\n" not in message
    assert os.listdir(tmp_path) == ["a_file"]


# -- a full disk, for real: a file-size limit makes write() fail (EFBIG) inside the library writing -----
_FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightrlhf.errors import UserError
from lightrlhf.io import atomic_directory, atomic_write, atomic_write_text

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
target, writer = Path(sys.argv[1]), sys.argv[2]
tensors = {"w": torch.zeros(100_000)}  # 400 kB
try:
    if writer == "torch.save":
        atomic_write(target, lambda f: torch.save(tensors, f))
    elif writer == "safetensors":
        with atomic_directory(target) as staging:
            save_file(tensors, staging / "model.safetensors")
    else:
        atomic_write_text(target, "x" * 200_000)
except UserError as error:
    print(f"UserError: {error}")
"""


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "text"])
def test_a_full_disk_is_a_storage_error_whatever_library_writes(tmp_path, writer):
    """torch.save reports the failed write as a RuntimeError of its own, safetensors as a SafetensorError:
    each is one line naming the file, the previous version intact, no temporary file left."""
    import subprocess
    import sys

    target = tmp_path / ("export" if writer == "safetensors" else "state.bin")
    if writer == "safetensors":
        target.mkdir()
        (target / "old.txt").write_text("old")
    else:
        target.write_text("old")
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(target), writer], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"UserError: {target}: cannot write (File too large); nothing was replaced"]
    assert os.listdir(tmp_path) == [target.name]
    if writer == "safetensors":
        assert os.listdir(target) == ["old.txt"]
    else:
        assert target.read_text() == "old"


def test_write_failure_finds_the_os_error_behind_a_library_error():
    import errno

    from lightrlhf.io import write_failure

    assert write_failure(KeyboardInterrupt()) is None and write_failure(ValueError("a bug")) is None
    disk = OSError(errno.ENOSPC, "No space left on device")
    assert write_failure(disk) is disk
    assert write_failure(RuntimeError("unexpected pos 64 vs 0"), recorded=disk) is disk
    try:
        try:
            raise disk
        except OSError as error:
            raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert write_failure(wrapped) is disk
    for message in ("Error while serializing: I/O error: Read-only file system (os error 30)",
                    "IoError(Os { code: 30, kind: ReadOnlyFilesystem })"):
        found = write_failure(Exception(message))  # safetensors' SafetensorError
        assert (found.errno, found.strerror) == (errno.EROFS, os.strerror(errno.EROFS))
