"""Counting the times a call makes the host wait for the GPU (the device-sensitive stage tests use it)."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def gpu_waits(device: torch.device, call: Callable[[], object]):
    """(call's result, how many synchronizing CUDA operations torch's sync debug mode reported; None off CUDA).

    Besides a stage's own reads, the synchronize that ends each stage's timing (pipeline/stage_timing.py) may be
    among them: whether the debug mode reports `torch.cuda.synchronize` depends on torch's version."""
    if device.type != "cuda":
        return call(), None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return result, sum("synchroniz" in str(w.message) for w in caught)
