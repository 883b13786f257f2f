"""Dataset errors users can cause (missing or malformed files); each carries a one-line message naming the culprit."""
from segment.errors import SegmentError


class DatasetError(SegmentError):
    """A dataset file or folder is missing, unreadable or malformed.

    Raised in a DataLoader worker, it comes back to the main process as a DatasetError around the worker's whole
    traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): the error then
    keeps only the worker's own message, the one line users need, and the traceback in `worker_traceback`.
    """

    def __init__(self, message: str = "") -> None:
        self.worker_traceback = None
        if isinstance(message, str) and message.startswith(f"Caught {type(self).__name__} "):
            # the traceback ends with the worker's exception as Python prints it: "<module>.<class>: <message>"
            formatted = f"\n{type(self).__module__}.{type(self).__qualname__}: "
            at = message.rfind(formatted)
            if at >= 0:
                self.worker_traceback, message = message, message[at + len(formatted):].rstrip("\n")
        super().__init__(message)
