"""Type and range checks for settings, so that a bad value is one line before any work, not a traceback later.

Hydra hands over values as typed: `overwrite=no` is text and `batch_size=1.5` a float, which Python would take
as true and torch would round. Each check returns the value it accepted.
"""
from __future__ import annotations

import math

from common.errors import SettingError


def check_settings(cfg, known: tuple[str, ...], group: str) -> None:
    """A config group's keys must all be ones its stage reads: a typo is an error, not a silent default."""
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise SettingError(f"unknown {group} setting(s) {', '.join(unknown)}; known: {', '.join(known)}")


def whole(value, key: str, low: float = 0, high: float = math.inf, *, nullable: bool = False) -> int | None:
    """A whole number from `low` to `high`: 1.5, true and text are errors, not rounded or read as 1."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high:
        if high == math.inf:
            span = "" if low == -math.inf else f" >= {low}"
        else:
            span = f" from {low} to {high}"
        raise SettingError(f"{key} must be a whole number{span}{_or_null(nullable)}, got {value!r}")
    return value


def number(value, key: str, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, nullable: bool = False) -> float | None:
    """A finite number from `low` to `high`, each end included unless said open."""
    if value is None and nullable:
        return None
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not finite or value < low or value > high or (low_open and value == low) or (high_open and value == high):
        kind = "a number" if math.isfinite(low) and math.isfinite(high) else "a finite number"
        raise SettingError(f"{key} must be {kind}{_span(low, high, low_open, high_open)}{_or_null(nullable)}, "
                           f"got {value!r}")
    return float(value)


def flag(value, key: str) -> bool:
    """true or false: `overwrite=no` is text, which Python would take as true."""
    if not isinstance(value, bool):
        raise SettingError(f"{key} must be true or false, got {value!r}")
    return value


def _span(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if low == -math.inf and high == math.inf:
        return ""
    if high == math.inf:
        return f" {'>' if low_open else '>='} {low}"
    if low == -math.inf:
        return f" {'<' if high_open else '<='} {high}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _or_null(nullable: bool) -> str:
    return " or null" if nullable else ""
