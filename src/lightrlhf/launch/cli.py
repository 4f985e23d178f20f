"""Process-level handling around Hydra's `main`: exit codes and the one-line messages.

A user's mistake -- a `UserError` from our code, or a config Hydra cannot compose (unknown group
option, bad override syntax, key not in the config) -- ends the process with exit status 2 and a
single line on stderr. Anything else is a bug and keeps its full traceback (exit status 1).
Hydra would otherwise print its own multi-line report and exit 1 for both; with
HYDRA_FULL_ERROR=1 it re-raises instead and the decision is made here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from lightrlhf.errors import UserError
from lightrlhf.launch.record import with_recorded_overrides

_NOISE = ("full_key:", "object_type=", "reference_type=", "To append to your config use", "Set the environment variable",
          "Config search path", "provider=")


def condensed(error: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep what says what is wrong, on one line."""
    parts, seen = [], set()
    current: BaseException | None = error
    while current is not None:
        for line in str(current).splitlines():
            line = line.strip()
            if line and not line.startswith(_NOISE) and line not in seen:
                seen.add(line)
                parts.append(line)
        current = current.__cause__
    return " ".join(parts) or type(error).__name__


def _is_config_error(error: BaseException) -> bool:
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (ConfigCompositionException, MissingConfigException, OverrideParseException,
                              OmegaConfBaseException))


def _quoting_hint(error: BaseException) -> str:
    """Hydra's override grammar takes unquoted values in ASCII only: a path in Chinese must be quoted."""
    from hydra.errors import OverrideParseException

    if isinstance(error, OverrideParseException) and not str(error).isascii():
        return ("""; a value with characters outside ASCII (a path in Chinese, say) must be quoted: """
                """'data.path="/数据/偏好.jsonl"'""")
    return ""


def exit_for_user_error(error: UserError) -> None:
    """Print the one line and leave with status 2 (SystemExit passes through Hydra untouched)."""
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(error.exit_code)


def cli(hydra_main: Callable[[], Any]) -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        sys.argv = with_recorded_overrides(sys.argv)  # resume=<dir>: the run's own overrides first
        hydra_main()
    except UserError as error:
        exit_for_user_error(error)
    except KeyboardInterrupt as interrupt:
        # RunInterrupted carries what was saved and how to continue; a bare Ctrl-C outside training does not
        sys.stderr.write(f"{interrupt}\n" if str(interrupt) else "interrupted\n")
        sys.exit(getattr(interrupt, "exit_code", 130))
    except Exception as error:
        if _is_config_error(error):
            sys.stderr.write(f"error: config: {condensed(error)}{_quoting_hint(error)}\n")
            sys.exit(UserError.exit_code)
        raise
