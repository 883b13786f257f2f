"""What the argparse command lines share (segment.evaluate's, the scripts', stylize.list's and stylize.import_onnx's):
types that refuse a bad value in one line before any work, and the one-line report of an expected error or a stop
signal during the work.

A value argparse refuses ends as argparse's usage and `error: argument --frames: ...`, exit status 2; a `UserError`
raised later (a file that is no style bank, a setting the model refuses) as `error: <one line>`, exit status 2; a
stop signal as `error: interrupted: nothing written` (or what is), exit status 128 + its number.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from common.errors import SettingError, UserError, one_line
from common.outputs import HeldStopSignals, record_output, recording_outputs
from common.signals import STOP_SIGNALS, exit_status, on_stop_signals, stop_until

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
    """argparse type of --device: auto, cpu, cuda or cuda:N of a GPU this machine has (common.device.resolve_device),
    so that a bad name is refused here and not by the first tensor moved to it, after the set-up; argparse names the
    option in the message ("argument --device: cuda asked for, ...: use auto or cpu"), not the Hydra apps' setting
    (`use device=auto`)."""
    from common.device import resolve_device  # here: the helper modules' --help (library_main) need not load torch

    try:
        return resolve_device(text, None)
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
    """Wraps a command's `main`: an expected, user-fixable error (`UserError`) raised by its work ends as one line on
    stderr and exit status 2, as the package entry points end; so does a stop signal (Ctrl-C, SIGTERM, SIGHUP: raised
    as Ctrl-C is, so that the clean-ups run), with what it left written and 128 + its number. A signal that comes
    once the command's last output is in place (`last_output`) stops nothing: a note at the end. Anything else is a
    bug and keeps its traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        with recording_outputs() as written:
            command = _Command(written)
            with _stopped_by_signals(command):
                try:
                    status = main(*args, **kwargs) or 0
                except UserError as error:
                    print(f"error: {one_line(error)}", file=sys.stderr)
                    return 2
                except KeyboardInterrupt as interrupt:
                    print(f"error: {command.interrupted()}", file=sys.stderr)
                    return exit_status(interrupt)
        if command.late:
            print(f"note: {signal.Signals(command.late[0]).name} came once the output was complete: it is kept",
                  file=sys.stderr)
        return status

    return run


class _Command:
    """A running command's outputs put in place, the one that completes it, and the stop signals that came after that
    one (they stop nothing)."""

    def __init__(self, written: list[Path]):
        self.written = written
        self.last: Path | None = None
        self.late: list[int] = []

    def complete(self) -> bool:
        return self.last is not None and self.last in self.written

    def interrupted(self) -> str:
        kept = [str(path) for path in dict.fromkeys(self.written) if os.path.lexists(path)]  # not a temp folder's
        if not kept:
            return "interrupted: nothing written"
        more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
        return f"interrupted: only {', '.join(kept[:3])}{more} written"


_running: list[_Command] = []  # a command's main may run another's: the innermost last


@contextmanager
def _stopped_by_signals(command: _Command) -> Iterator[None]:
    """`command.stop` handles the stop signals for the block (an ignored one stays ignored), the handlers before it
    put back after it: a main called in-process (tests, another command) leaves its caller's."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        on_stop_signals(stop_until(command.complete, command.late))
    _running.append(command)
    try:
        yield
    finally:
        _running.remove(command)
        for signum, handler in handlers.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)


def last_output(path: str | Path) -> None:
    """Tells the running command (`reports_user_errors`) which output completes it, before writing it: once that one
    is in place (an AtomicOutput's rename, or `writing_in_place`), a stop signal stops nothing."""
    if _running:
        _running[-1].last = Path(path).absolute()


@contextmanager
def writing_in_place(path: Path | None, last: bool = True) -> Iterator[None]:
    """The block that writes `path` other than through AtomicOutput (a report appended to; None: no file): the stop
    signals held back across it, then `path` counted as written, so that a stopped command does not say "nothing
    written" beside it; `last`: it completes the command (`last_output`)."""
    with HeldStopSignals():
        yield
        if path is not None:
            if last:
                last_output(path)
            record_output(path)


def library_main(argv: list[str] | None, prog: str, doc: str, users: str) -> NoReturn:
    """What a helper module of the scripts does when run: `--help` says what it is for and who imports it; anything
    else is refused in one line (it has nothing to run), where it used to exit 0 silently."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0],
                                     epilog=f"A library, not a command: {users} import it.")
    parser.parse_args(argv)
    parser.error(f"nothing to run: this is a library that {users} import (--help)")
