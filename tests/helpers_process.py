"""Start a child process that Ctrl-C (SIGINT), SIGTERM and SIGHUP reach, whatever the test runner inherited."""
from __future__ import annotations

import signal
import subprocess


def _default_stop_signals() -> None:
    # A runner started in the background (nohup, `&` in a script) ignores SIGINT (and under nohup SIGHUP), and
    # children inherit that; the render leaves an ignored signal ignored, so the test could not exercise its path.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def interruptible_popen(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, preexec_fn=_default_stop_signals, **kwargs)
