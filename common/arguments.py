"""What the argparse command lines share (segment.evaluate's, the scripts'): types that refuse a bad value in one
line before any work, and the one-line report of an expected error raised during the work.

A value argparse refuses ends as argparse's usage and `error: argument --frames: ...`, exit status 2; a `UserError`
raised later (a file that is no style bank, a setting the model refuses) as `error: <one line>`, exit status 2.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from common.errors import SettingError, UserError, one_line

if TYPE_CHECKING:
    import torch


def whole_number(low: int = 0, multiple_of: int = 1) -> Callable[[str], int]:
    """argparse type: a whole number >= `low` (and a multiple of `multiple_of`); worded as common.settings.whole."""
    span = f">= {low}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {text!r}") from None
        if value < low or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {value}")
        return value

    return parse


def finite_number(low: float = -math.inf) -> Callable[[str], float]:
    """argparse type: a finite number >= `low` (float() alone takes nan and inf, which every comparison fails)."""
    span = "" if low == -math.inf else f" >= {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number{span}, got {text!r}")
        return value

    return parse


def torch_device(text: str) -> torch.device:
    """argparse type: auto, cpu, cuda or cuda:N of a GPU this machine has (common.device.resolve_device), so that a
    bad name is refused here and not by the first tensor moved to it, after the set-up."""
    from common.device import resolve_device  # here: the helper modules' --help (library_main) need not load torch

    try:
        return resolve_device(text, "device")
    except SettingError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def existing_file(text: str) -> Path:
    """argparse type: a file that exists (a checkpoint, a style bank, a clip), refused before anything is built."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {text}")
    return path


def reports_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a script's `main`: an expected, user-fixable error (`UserError`) raised by its work ends as one line on
    stderr and exit status 2, as the package entry points end; anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2

    return run


def library_main(argv: list[str] | None, prog: str, doc: str, users: str) -> NoReturn:
    """What a helper module of the scripts does when run: `--help` says what it is for and who imports it; anything
    else is refused in one line (it has nothing to run), where it used to exit 0 silently."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0],
                                     epilog=f"A library, not a command: {users} import it.")
    parser.parse_args(argv)
    parser.error(f"nothing to run: this is a library that {users} import (--help)")
