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


def exit_for_user_error(error: UserError) -> None:
    """Print the one line and leave with status 2 (SystemExit passes through Hydra untouched)."""
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(error.exit_code)


def with_recorded_overrides(argv: list[str]) -> list[str]:
    """`resume=<dir> stage.rollouts=400`: Hydra composes the config before `run` reads the run's record,
    and a key of the resumed run's stage or model is unknown to the default ones. The recorded
    overrides go first, so the first composition already has the run's config groups; the current ones
    follow and win. A change of an identity group (stage, model, data) is left for `run` to refuse."""
    from pathlib import Path

    from lightrlhf.launch.run import identity_change, override_key, read_record

    given = argv[1:]
    resume = [a.split("=", 1)[1] for a in given if a.startswith("resume=")]
    if not resume or any(a in ("-m", "--multirun") for a in given):
        return argv
    overrides = [a for a in given if not a.startswith("-") and "=" in a]
    try:
        record = read_record(Path(resume[-1]).expanduser())
        recorded = {override_key(o): str(o) for o in record.get("overrides", [])}
        current = {override_key(a) for a in overrides}
    except Exception:  # no record, an unreadable one, a bad override: `run` or Hydra reports it in one line
        return argv
    if identity_change(overrides, record.get("choices", {})) is not None:
        return argv
    return argv[:1] + [text for key, text in recorded.items() if key not in current] + given


def cli(hydra_main: Callable[[], Any]) -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = with_recorded_overrides(sys.argv)
    try:
        hydra_main()
    except UserError as error:
        exit_for_user_error(error)
    except KeyboardInterrupt as interrupt:
        # RunInterrupted carries what was saved and how to continue; a bare Ctrl-C outside training does not
        sys.stderr.write(f"{interrupt}\n" if str(interrupt) else "interrupted\n")
        sys.exit(getattr(interrupt, "exit_code", 130))
    except Exception as error:
        if _is_config_error(error):
            sys.stderr.write(f"error: config: {condensed(error)}\n")
            sys.exit(UserError.exit_code)
        raise
