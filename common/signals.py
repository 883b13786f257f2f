"""The signals that stop a run (Ctrl-C, SIGTERM from a scheduler or `timeout`, SIGHUP when the terminal closes or
the ssh link drops), raised where the run is, as Ctrl-C is, so that every clean-up runs; the exit status is the
shell's for a process the signal ended, 128 + its number. Light: the render installs them before torch loads."""
from __future__ import annotations

import signal
from collections.abc import Callable

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C is (`except KeyboardInterrupt` catches it); `signum` gives the exit status."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def on_stop_signals(handler: Callable[[int, object], None] = raise_stopped) -> None:
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
