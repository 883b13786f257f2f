"""Errors a user can cause and fix: each carries a one-line message naming the file or value at fault.

Entry points print `error: <message>` and exit nonzero for any `UserError`; anything else is a bug and keeps its
traceback. Each package's own errors (RenderError, SegmentError, StyleError) derive from it.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class for every expected, user-fixable failure."""


class SettingError(UserError, ValueError):
    """A setting has the wrong type, is out of range, or names something that does not exist."""


class OutputError(UserError):
    """An output path cannot be written safely (exists, equals the input, folder missing or read-only)."""


def one_line(error: BaseException) -> str:
    """What an entry point prints after `error: `: the message's first line, or the error's type without one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
