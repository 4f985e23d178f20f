"""Small argument checks for constructors, raising `ConfigValueError` with the parameter's name.

The config builder turns these into one-line messages naming the full config key, so a check
written once here reads `config stage.cliprange: must be > 0, got -0.2` to the user.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightrlhf.errors import ConfigValueError


def require(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise ConfigValueError(param, message)


def positive(param: str, value: float | int) -> None:
    require(value > 0, param, f"must be > 0, got {value!r}")


def non_negative(param: str, value: float | int) -> None:
    require(value >= 0, param, f"must be >= 0, got {value!r}")


def in_range(param: str, value: float, low: float, high: float) -> None:
    """Closed interval [low, high]."""
    require(low <= value <= high, param, f"must be in [{low}, {high}], got {value!r}")


def one_of(param: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, param, f"must be one of {choices}, got {value!r}")
