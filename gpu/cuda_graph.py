"""One CUDA graph: a function captured on fixed input buffers and replayed with a single launch.

Worth it where a call is bound by launching its kernels rather than by running them (small batches of small
images: the style network on crops, the segmenter's front at batch 1; docs/benchmarks.md).
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor


# One capture at a time in the process: torch.cuda.graph synchronizes the whole device as it begins, which CUDA
# refuses while another thread's capture is open (the render's segment and stylize threads both capture), and a
# second capture begun beside an open one fails (cudaErrorIllegalState): both seen on an H200, GPU session 7
_CAPTURE_LOCK = threading.Lock()


class CapturedGraph:
    """`forward(*inputs)` captured on `inputs` (which become the graph's input buffers).

    `replay(*values)` copies each value into the leading rows of its buffer, replays, and returns the graph's
    own outputs: the same tensors every time, overwritten by the next replay of any graph sharing the pool.
    Work queued on the same stream before that replay still reads the old values (stream order).
    """

    def __init__(self, forward: Callable, inputs: tuple[Tensor, ...], pool=None) -> None:
        self.inputs = inputs
        self.device = inputs[0].device
        # on the inputs' GPU, which need not be the current one (device=cuda:1): the capture and replay streams
        # are the current device's
        with _CAPTURE_LOCK, torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # cuDNN picks its algorithms and lazy state is built outside the capture
                forward(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the render's decode and encode threads copy to and from the GPU while this one captures
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs = forward(*inputs)

    def replay(self, *values: Tensor):
        for buffer, value in zip(self.inputs, values):
            buffer[: value.shape[0]].copy_(value)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


class GraphCache:
    """CUDA graphs of one function, one per key (its input shapes and whatever else changes the kernels).

    A key is captured the `after_calls`-th time it comes, so one-off shapes stay eager; beyond `max_graphs` the
    least recently used graph is dropped. All graphs share one memory pool: safe as long as each replay's outputs
    are used (or copied) before the next replay, which is how both callers work.
    """

    def __init__(self, forward: Callable, max_graphs: int, after_calls: int = 2) -> None:
        self.forward, self.max_graphs, self.after_calls = forward, max_graphs, after_calls
        self.seen: Counter = Counter()
        self.captured: OrderedDict[Hashable, CapturedGraph] = OrderedDict()
        self.pool = None

    def lookup(self, key: Hashable, buffers: Callable[[], tuple[Tensor, ...]]) -> CapturedGraph | None:
        """The graph for `key`, captured now on `buffers()` if this is its `after_calls`-th call; None: run eagerly."""
        graph = self.captured.get(key)
        if graph is None:
            self.seen[key] += 1
            if self.seen[key] < self.after_calls:
                return None
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = self.captured[key] = CapturedGraph(self.forward, buffers(), self.pool)
            if len(self.captured) > self.max_graphs:
                self.captured.popitem(last=False)
        self.captured.move_to_end(key)
        return graph

    def clear(self) -> None:
        self.seen.clear()
        self.captured.clear()
