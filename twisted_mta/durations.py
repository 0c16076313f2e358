"""Durations as the config file and the plugins' options write them.

A number of seconds, or a string of a number and a unit: "30" or "30s",
"5m", "4h", "5d", "1w".  One reading for every key that takes a duration,
so that an administrator writes them the same way everywhere.
"""

from __future__ import annotations

import math
import re
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class DurationError(ValueError):
    """Not a duration; ``expected`` says what would have been."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def seconds(value: Any) -> float:
    """The seconds ``value`` stands for (0 or more); raises DurationError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        number, unit = match.groups()
        result = float(number) * _UNITS[unit.lower()]
    else:
        raise DurationError('seconds or a duration like "5m"')
    if not math.isfinite(result) or result < 0:
        raise DurationError("a finite duration of 0 or more")
    return result


def option_seconds(value: Any, key: str, *, positive: bool = False) -> float:
    """A plugin option's duration; ValueError naming ``key`` otherwise."""
    try:
        result = seconds(value)
    except DurationError as error:
        raise ValueError(f"{key}: expected {error.expected}, not {value!r}") from None
    if positive and result == 0:
        raise ValueError(f"{key}: expected a duration of more than 0, not {value!r}")
    return result
