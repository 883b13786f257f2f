"""Start a child process that Ctrl-C (SIGINT) reaches, whatever the test runner inherited."""
from __future__ import annotations

import signal
import subprocess


def _default_sigint() -> None:
    # A runner started in the background (nohup, `&` in a script) ignores SIGINT, and children inherit that;
    # Python then never raises KeyboardInterrupt, so the test could not exercise the Ctrl-C path.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interruptible_popen(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, preexec_fn=_default_sigint, **kwargs)
