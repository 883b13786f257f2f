"""What the profile scripts share: host syncs of one call, and a torch.profiler summary of a few calls.

A library of scripts/profile_segment.py and of the benchmarks' --profile / --operators: running it only says so.
"""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


def host_syncs(call: Callable[[], object]) -> int:
    """How many times one `call()` made the host wait for the GPU (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


class _OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # a view launches nothing
        return func(*args, **(kwargs or {}))


def operators(call: Callable[[], object]) -> int:
    """How many tensor operators one `call()` ran, views excluded, backward and optimizer included: on a GPU nearly
    each is a kernel launch, so on a CPU it measures the launch overhead a GPU would pay."""
    with _OperatorCounter() as counter:
        call()
    return counter.count


def print_profile(call: Callable[[], object], runs: int, cuda: bool, label: str, rows: int = 15) -> None:
    """Wall time, GPU kernel time and launches per call, then the top operators by host and by GPU time."""
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        start = time.perf_counter()
        for _ in range(runs):
            call()
        synchronize()
        wall = (time.perf_counter() - start) / runs
    events = profiler.key_averages()
    line = f"{label}: {wall * 1000:.2f} ms per call under the profiler; {operators(call)} operators"
    if cuda:
        kernels = sum(e.self_device_time_total for e in events  # kernel rows, as the profiler's own total counts them
                      if e.device_type == torch.autograd.DeviceType.CUDA
                      and not getattr(e, "is_user_annotation", False))
        launches = sum(e.count for e in events if e.key in LAUNCHES)
        graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
        line += (f"; GPU kernels {kernels / runs / 1000:.2f} ms in {launches / runs:.0f} launches "
                 f"and {graphs / runs:.0f} graph launches; host syncs {host_syncs(call)}")
    print(line)
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=40))


if __name__ == "__main__":  # not a command: say so (and what it is for) instead of exiting 0 without a word
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common.arguments import library_main

    sys.exit(library_main(sys.argv[1:], "scripts/profiling.py", __doc__,
                          "scripts/profile_segment.py, bench_train.py and bench_stylize.py (--profile) and "
                          "bench_render.py (--operators)"))
