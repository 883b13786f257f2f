"""Threaded streaming: a producer thread (decode), one thread per processing step (the model stages, the last step
on the calling thread), a consumer thread (encode).

Bounded queues between them keep memory flat and let decode, GPU work and encode overlap; two or more steps let
one batch's stages overlap the next batch's (on a GPU their host work, which binds the render there: PyTorch
lets go of the GIL inside each operator; and their kernels, each thread queuing on a CUDA stream of its own,
pipeline/thread_stream.py). Every blocking call polls a shared stop flag, so an error in any
thread (or Ctrl-C in the calling thread) stops them all promptly: no thread is left hanging and the first
error is re-raised in the caller.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from pipeline.errors import PipelineConfigError

T = TypeVar("T")
STEP_QUEUE_SIZE = 2  # items waiting between two processing steps: enough to overlap them; more would hold memory
_DONE = object()
_POLL_S = 0.1


def run_streaming(source: Iterable[T], process: Callable[[T], T] | Sequence[Callable[[T], T]],
                  sink: Callable[[T], None], queue_size: int = 8) -> int:
    """Feeds every item of `source` through `process` into `sink` (own thread), in order.

    `process` is one callable (run on the calling thread) or several, applied in turn: each but the last on a
    thread of its own, the last on the calling thread. `source` is iterated on its own thread. Up to
    `queue_size` items wait after the source and before the sink, up to STEP_QUEUE_SIZE between two steps.
    Returns the number of items sunk.
    """
    if queue_size < 1:
        raise PipelineConfigError(f"queue_size must be >= 1, got {queue_size}")
    steps = [process] if callable(process) else list(process)
    if not steps:
        raise PipelineConfigError("run_streaming needs at least one processing step")
    stop = threading.Event()
    errors: list[BaseException] = []
    # into each step, then into the sink
    queues = [queue.Queue(maxsize=queue_size if i in (0, len(steps)) else min(queue_size, STEP_QUEUE_SIZE))
              for i in range(len(steps) + 1)]
    sunk = 0

    def fail(error: BaseException) -> None:
        errors.append(error)
        stop.set()

    def produce() -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                if not _put(queues[0], item, stop):
                    return
            _put(queues[0], _DONE, stop)
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            fail(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator: run its finally blocks (close the input file) now
                close()

    def relay(step: Callable[[T], T], inbox: queue.Queue, outbox: queue.Queue) -> None:
        while (item := _get(inbox, stop)) is not _DONE and item is not None:
            if not _put(outbox, step(item), stop):
                return
        if item is _DONE:
            _put(outbox, _DONE, stop)

    def work(step: Callable[[T], T], inbox: queue.Queue, outbox: queue.Queue) -> None:
        try:
            relay(step, inbox, outbox)
        except BaseException as error:  # noqa: BLE001
            fail(error)

    def consume() -> None:
        nonlocal sunk
        try:
            while (item := _get(queues[-1], stop)) is not _DONE and item is not None:
                sink(item)
                sunk += 1
        except BaseException as error:  # noqa: BLE001
            fail(error)

    threads = [threading.Thread(target=produce, name="decode", daemon=True),
               *(threading.Thread(target=work, args=(step, queues[i], queues[i + 1]), name=f"stages-{i}",
                                  daemon=True) for i, step in enumerate(steps[:-1])),
               threading.Thread(target=consume, name="encode", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        relay(steps[-1], queues[-2], queues[-1])
    except BaseException as error:
        fail(error)
    finally:
        if errors:
            stop.set()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return sunk


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    """The next item, or None once `stop` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
    return None
