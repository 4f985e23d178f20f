"""The one kind of error a user is meant to read.

A `UserError` is a mistake in what the user gave us (a data file, a config value, a path).
It carries a single line that says *where* and *what*; `lightrlhf.launch.cli` prints that line to
stderr and exits with status 2, without a traceback. Anything else that escapes is a bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would defeat `grep` and log scrapers.
        super().__init__(" ".join(str(message).split("\n")).strip())


class DataError(UserError):
    """A problem inside a data file, located by file and line (or row)."""

    def __init__(self, path: str | Path, line: int | None, message: str, unit: str = "") -> None:
        self.path, self.line, self.problem = str(path), line, message
        where = self.path if line is None else f"{self.path}:{unit}{line}"
        super().__init__(f"{where}: {message}")


class ConfigError(UserError):
    """A wrong config value, located by its dotted key (e.g. `model.lora.r`)."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.problem = key, message
        super().__init__(f"config {key}: {message}" if key else f"config: {message}")


class ConfigValueError(ValueError):
    """Raised by a constructor for a bad argument; the config builder adds the dotted key path.

    Library code does not know where in the config tree it was built from, so it names only its own
    parameter; `lightrlhf.launch.build` turns this into a `ConfigError` naming the full key.
    """

    def __init__(self, param: str, message: str) -> None:
        self.param, self.problem = param, message
        super().__init__(f"{param}: {message}")
