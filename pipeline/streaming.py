"""Three-thread streaming: a producer thread (decode), the calling thread (model stages), a consumer thread (encode).

Bounded queues between them keep memory flat and let decode, GPU work and encode overlap. Every blocking call
polls a shared stop flag, so an error in any thread (or Ctrl-C in the calling thread) stops all three promptly:
no thread is left hanging and the first error is re-raised in the caller.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from pipeline.errors import PipelineConfigError

T = TypeVar("T")
_DONE = object()
_POLL_S = 0.1


def run_streaming(source: Iterable[T], process: Callable[[T], T], sink: Callable[[T], None],
                  queue_size: int = 8) -> int:
    """Feeds every item of `source` through `process` (calling thread) into `sink` (own thread), in order.

    `source` is iterated on its own thread. Returns the number of items sunk.
    """
    if queue_size < 1:
        raise PipelineConfigError(f"queue_size must be >= 1, got {queue_size}")
    stop = threading.Event()
    errors: list[BaseException] = []
    inbox: queue.Queue = queue.Queue(maxsize=queue_size)
    outbox: queue.Queue = queue.Queue(maxsize=queue_size)
    sunk = 0

    def fail(error: BaseException) -> None:
        errors.append(error)
        stop.set()

    def produce() -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                if not _put(inbox, item, stop):
                    return
            _put(inbox, _DONE, stop)
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            fail(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator: run its finally blocks (close the input file) now
                close()

    def consume() -> None:
        nonlocal sunk
        try:
            while (item := _get(outbox, stop)) is not _DONE and item is not None:
                sink(item)
                sunk += 1
        except BaseException as error:  # noqa: BLE001
            fail(error)

    threads = [threading.Thread(target=produce, name="decode", daemon=True),
               threading.Thread(target=consume, name="encode", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while (item := _get(inbox, stop)) is not _DONE and item is not None:
            if not _put(outbox, process(item), stop):
                break
        else:
            if item is _DONE:
                _put(outbox, _DONE, stop)
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
