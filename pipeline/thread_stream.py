"""A CUDA stream per pipeline thread, so that the threads' GPU work overlaps.

On one shared stream the threads' kernels run one after another, and every wait for the GPU (a read to the
host, the synchronize that ends a stage's timing) waits for the other threads' queued work too. With a stream
per thread (decode, each group of model stages) they overlap. Two rules keep that safe without events:

- a batch leaves a thread with that thread's GPU work on it done (its stream is synchronized), so the next
  thread reads finished tensors whatever stream it runs on;
- a thread marks every tensor it receives as used on its own stream (`record_stream`). Otherwise, when it drops
  one whose kernels are still queued, the caching allocator could hand the memory back to the stream that made
  it (the previous thread), which would overwrite it under those kernels.

The encode thread stays on the default stream: every frame it takes is finished, and it reads each to the host.
Off CUDA every method does nothing beyond running the step.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from pipeline.record import FrameRecord

Batch = list[FrameRecord]


class ThreadStream:
    """The CUDA stream of one pipeline thread (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def active(self):
        """Context in which the calling thread's CUDA work goes to this stream."""
        return nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        """Waits for this stream's work only (not the other threads')."""
        if self.stream is not None:
            self.stream.synchronize()

    def run(self, step: Callable[[Batch], Batch], batch: Batch) -> Batch:
        """`step(batch)` on this stream; returns with its GPU work done."""
        if self.stream is None:
            return step(batch)
        with self.active():
            for record in batch:
                for tensor in record.tensors():
                    if tensor.is_cuda:
                        tensor.record_stream(self.stream)
            try:
                return step(batch)
            finally:
                self.synchronize()
