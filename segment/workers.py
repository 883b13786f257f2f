"""DataLoader workers that leave the stop signals to the process they work for.

`timeout` and job schedulers send SIGTERM to the whole process group, and a closed terminal sends SIGHUP to its
foreground group: torch's own handler lets a worker die of such a signal, and the main process then raised
"DataLoader worker ... is killed by signal" in place of its clean interrupt (a traceback, exit status 1). A worker
started with `quiet_worker` as its `worker_init_fn`, inside `starting_workers()`, outlives a stop signal until the
main process has had its own: it goes on working, torch's shutdown of the loader ends it as any other, and it stops
quietly (torch's worker loop returns on KeyboardInterrupt) at a second stop signal (torch's `terminate` of a worker
slow to leave, multiprocessing's at exit) or `STOP_GRACE_S` after the first (a signal that reached no one else).
A worker that stopped at once made the main process fail on the batch it had queued last (its tensors are shared by
file descriptor, fetched from the worker: `FileNotFoundError`), or wait on it and find it gone, whenever the main
process came to the loader before it came to its own signal: a traceback, exit status 1, on a loaded machine.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from common.signals import STOP_SIGNALS

# blocked while workers start, so that a SIGTERM or SIGHUP cannot reach one before `quiet_worker` has set its
# handler (Ctrl-C's SIGINT a worker takes as KeyboardInterrupt already)
WORKER_START_SIGNALS = {s for s in STOP_SIGNALS if s != signal.SIGINT}

# How long a signalled worker waits for the main process to shut it down. The main process handles a signal sent to
# the group within milliseconds (Python runs its handler between two operations); a signal sent to the worker alone
# has no one else to act on it, and the worker must not linger for it.
STOP_GRACE_S = 3.0


def quiet_worker(worker_id: int) -> None:
    """A worker's `worker_init_fn`: its stop signals are held off as the module's docstring says, and unblocked."""
    from torch.utils.data import get_worker_info

    signalled = threading.Event()
    main_thread = threading.main_thread().ident

    def stop(signum: int, frame) -> None:
        # once torch's worker loop has returned (get_worker_info() is None) the worker is leaving anyway, and an
        # interrupt in multiprocessing's clean-up would print a traceback
        if signalled.is_set() and get_worker_info() is not None:
            raise KeyboardInterrupt
        signalled.set()

    def stop_after_grace() -> None:
        signalled.wait()
        time.sleep(STOP_GRACE_S)
        # at the main thread: a signal the process gets may go to another thread, leaving the main one blocked on
        # its index queue for torch's 5 s poll
        with contextlib.suppress(ProcessLookupError):
            signal.pthread_kill(main_thread, signal.SIGTERM)

    # started now, not in the handler: starting a thread there could wait on a lock that the interrupted code holds
    threading.Thread(target=stop_after_grace, name="quiet-worker-grace", daemon=True).start()
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_START_SIGNALS)


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """The block in which a DataLoader starts its workers (`iter(loader)`): they inherit the stop signals blocked
    and unblock them once `quiet_worker` ran. The main process's own mask is put back after."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_START_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
