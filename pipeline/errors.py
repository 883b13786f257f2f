"""Errors a user can cause and fix: each carries a one-line message naming the file or value at fault.

The render CLI prints these as `error: <message>` and exits 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class RenderError(Exception):
    """Base class for every expected, user-fixable render failure."""


class InputError(RenderError):
    """The input path is missing or unreadable."""


class NotAVideoError(InputError):
    """The input opens as no container, or holds no video stream."""


class AudioOnlyError(NotAVideoError):
    """The input holds audio but no video stream."""


class EmptyVideoError(InputError):
    """The video stream decodes to zero frames."""


class TruncatedVideoError(InputError):
    """The video stream breaks off: a decoder error mid-stream, or far fewer frames than the container declares."""


class OutputError(RenderError):
    """The output path cannot be written safely (exists, equals the input, folder missing or read-only)."""


class EncoderError(RenderError):
    """The chosen encoder is missing, cannot open on this machine, or rejects its settings."""


class PipelineConfigError(RenderError, ValueError):
    """A pipeline setting is out of range or names something that does not exist (an unknown class, policy...)."""


def ffmpeg_reason(error: BaseException) -> str:
    """A library error's message on one line, without the errno noise PyAV adds."""
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split()) or type(error).__name__


def check_settings(cfg, known: tuple[str, ...], group: str) -> None:
    """A config group's keys must all be ones its stage reads: a typo is an error, not a silent default."""
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise PipelineConfigError(f"unknown {group} setting(s) {', '.join(unknown)}; known: {', '.join(known)}")


def whole(value, key: str, low: int = 0, high: int | None = None) -> int:
    """A setting that must be a whole number in [low, high]: 1.5, true and text are errors, not rounded or read
    as 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"from {low} to {high}"
        raise PipelineConfigError(f"{key} must be a whole number {span}, got {value!r}")
    return value


def number(value, key: str, low: float, high: float, high_open: bool = False, low_open: bool = False) -> float:
    """A setting that must be a number in the interval from `low` to `high` (each end shut unless said open)."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
    if bad or value < low or value > high or (low_open and value == low) or (high_open and value == high):
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise PipelineConfigError(f"{key} must be a number in {span}, got {value!r}")
    return float(value)


def flag(value, key: str) -> bool:
    """A setting that must be true or false: `overwrite=no` is text, which Python would take as true."""
    if not isinstance(value, bool):
        raise PipelineConfigError(f"{key} must be true or false, got {value!r}")
    return value
