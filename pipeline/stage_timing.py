"""Per-frame stage timings: one context manager shared by the model stages."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.record import FrameRecord


@contextmanager
def timed(batch: list[FrameRecord], stage: str) -> Iterator[None]:
    """Adds the block's seconds, split evenly over the batch, to each record's `timings[stage]`.

    On CUDA the block ends by synchronizing the calling thread's current stream, so GPU work is charged to the
    stage that queued it. Only that stream: each pipeline thread queues on a stream of its own
    (pipeline/thread_stream.py), and a device-wide synchronize would wait for the other threads' work too.
    That costs the pipeline little: every stage already waits on the GPU for a host-side decision
    (detections kept, Hungarian matching, crop boxes), and a batch leaves its thread with its work done anyway.
    """
    device = batch[0].image.device if batch else torch.device("cpu")
    start = time.perf_counter()
    try:
        with torch.profiler.record_function(stage):  # groups the stage's operators in a profile
            yield
    finally:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        share = (time.perf_counter() - start) / max(1, len(batch))
        for record in batch:
            record.timings[stage] = record.timings.get(stage, 0.0) + share
