"""DataLoader workers that leave the stop signals to the process they work for.

`timeout` and job schedulers send SIGTERM to the whole process group, and a closed terminal sends SIGHUP to its
foreground group: torch's own handler lets a worker die of such a signal, and the main process then raised
"DataLoader worker ... is killed by signal" in place of its clean interrupt (a traceback, exit status 1). A worker
started with `quiet_worker` as its `worker_init_fn`, inside `starting_workers()`, stops as Ctrl-C stops it: quietly
(torch's worker loop returns on KeyboardInterrupt), the interrupt left to the main process.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from common.signals import STOP_SIGNALS

# blocked while workers start, so that a SIGTERM or SIGHUP cannot reach one before `quiet_worker` has set its
# handler (Ctrl-C's SIGINT a worker takes as KeyboardInterrupt already)
WORKER_START_SIGNALS = {s for s in STOP_SIGNALS if s != signal.SIGINT}


def quiet_worker(worker_id: int) -> None:
    """A worker's `worker_init_fn`: its SIGTERM and SIGHUP raise KeyboardInterrupt, and are unblocked."""
    for signum in WORKER_START_SIGNALS:
        signal.signal(signum, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_START_SIGNALS)


@contextmanager
def starting_workers() -> Iterator[None]:
    """The block in which a DataLoader starts its workers (`iter(loader)`): they inherit the stop signals blocked
    and unblock them once `quiet_worker` ran. The main process's own mask is put back after."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_START_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
