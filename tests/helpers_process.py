"""Child processes for tests: one that Ctrl-C (SIGINT), SIGTERM and SIGHUP reach, whatever the test runner
inherited, and work run as a user whom file permissions bind; and a stop signal sent at a phase boundary."""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest


def _default_stop_signals() -> None:
    # A runner started in the background (nohup, `&` in a script) ignores SIGINT (and under nohup SIGHUP), and
    # children inherit that; the render leaves an ignored signal ignored, so the test could not exercise its path.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def interruptible_popen(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, preexec_fn=_default_stop_signals, **kwargs)


def run_interruptible(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`args` run to the end as `interruptible_popen` starts it, its output captured as text (killed if it has not
    ended after `timeout` seconds)."""
    process = interruptible_popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


NOBODY = 65534  # the unprivileged user (and group) of Debian and most containers


@contextlib.contextmanager
def unprivileged_folder():
    """A new folder that `as_unprivileged`'s user owns and can reach: pytest's tmp_path lies under a folder only
    root may enter (0700) when the tests run as root."""
    with tempfile.TemporaryDirectory(prefix="unprivileged-") as folder:
        os.chmod(folder, 0o755)
        if os.geteuid() == 0:
            os.chown(folder, NOBODY, NOBODY)
        yield Path(folder)


def as_unprivileged(work):
    """work()'s result (or its exception) as a user whom file permissions bind. Root writes into read-only
    folders anyway (CI runs the tests as root in a container), so under root `work` runs in a forked child that
    has dropped to nobody; the result comes back pickled. Skips only where the child cannot drop root. The child
    cannot import what the parent has not where the interpreter lies in a folder nobody may enter (a venv over
    root's pyenv): import what `work` needs first."""
    if os.geteuid() != 0:
        return work()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it reports and leaves without running the parent's code on
        try:
            os.close(read)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except PermissionError as error:
                outcome = ("skip", f"cannot drop root to uid {NOBODY}: {error}")
            else:
                try:
                    outcome = ("result", work())
                except Exception as error:  # raised again in the parent
                    outcome = ("error", error)
            try:
                report = pickle.dumps(outcome)
            except Exception:  # an unpicklable result or exception: its text at least
                report = pickle.dumps(("error", RuntimeError(repr(outcome[1]))))
            with os.fdopen(write, "wb") as pipe:
                pipe.write(report)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert report, f"the unprivileged child died without a report (wait status {status})"
    kind, value = pickle.loads(report)
    if kind == "skip":
        pytest.skip(value)
    if kind == "error":
        raise value
    return value


def then_signal(function, signum: int = signal.SIGINT, when=lambda *args: True):
    """`function`, which sends this process `signum` once it has returned, where `when(*args)` holds: a stop signal
    at that phase boundary, deterministically."""
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        if when(*args):
            os.kill(os.getpid(), signum)
        return result
    return call


def stop_after(monkeypatch, owner, name: str, when=lambda *args: True, signum: int = signal.SIGINT) -> None:
    """`owner.name` calls the real function, then sends this process `signum` (a user's Ctrl-C) where
    `when(*args)` holds."""
    monkeypatch.setattr(owner, name, then_signal(getattr(owner, name), signum, when))
