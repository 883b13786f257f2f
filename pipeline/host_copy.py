"""A batch's small per-frame tensors brought to the host together, so that a GPU is waited for once per batch.

Each read of a GPU tensor from the host (`.tolist()`, `.cpu()`) waits for everything queued before it on the
calling thread's stream (pipeline/thread_stream.py). Track, assign and composite need a few numbers per instance on
the host: they read a whole batch's with one copy.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_host(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """The tensors (one device, one dtype, any shapes, empty ones too) as CPU tensors of the same shapes, in one
    device-to-host copy: flattened, concatenated, copied, split back. A None (a frame with nothing to read) stays
    None."""
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in present]).cpu()
    host = iter(piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in present]), present))
    return [None if t is None else next(host) for t in tensors]
