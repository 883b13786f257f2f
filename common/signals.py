"""The signals that stop a run (Ctrl-C, SIGTERM from a scheduler or `timeout`, SIGHUP when the terminal closes or
the ssh link drops), raised where the run is, as Ctrl-C is, so that every clean-up runs; the exit status is the
shell's for a process the signal ended, 128 + its number. Light: the render installs them before torch loads."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable

Handler = Callable[[int, object], None]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C is (`except KeyboardInterrupt` catches it); `signum` gives the exit status."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


# what an argparse command says to a stop signal while its modules (torch) load, before its main takes the signals
STARTING = b"error: interrupted as it started: nothing written\n"


def leaving(message: bytes) -> Handler:
    """A stop signal's handler for a time when nothing needs cleaning up: `message`, then the signal's exit status
    (128 + its number). Not through sys.stderr: the signal may have come in the middle of a write to it."""
    def leave(signum: int, frame) -> None:
        os.write(2, message)
        os._exit(128 + signum)
    return leave


def stop_until(done: Callable[[], bool], late: list[int]) -> Handler:
    """A stop signal's handler: raised as Ctrl-C is (`Stopped`, so that the clean-ups run) until `done()` (the
    output is in place); one that comes after that stops nothing, its number goes into `late` for a note."""
    def stop(signum: int, frame) -> None:
        if done():
            late.append(signum)
        else:
            raise Stopped(signum)
    return stop


def on_stop_signals(handler: Handler = raise_stopped) -> None:
    """`handler` for every stop signal; an ignored one (nohup, a background job) stays ignored. SIGQUIT keeps its
    core dump: it is how a hung process is examined."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def stop_signal(interrupt: BaseException) -> int:
    """The number of the signal that raised `interrupt`; a plain KeyboardInterrupt's is Ctrl-C's."""
    return getattr(interrupt, "signum", signal.SIGINT)


def exit_status(interrupt: BaseException) -> int:
    """128 + the stop signal's number (Ctrl-C: 130), as a shell reports a process the signal ended."""
    return 128 + stop_signal(interrupt)
