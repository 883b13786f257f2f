"""A batch's small per-frame tensors brought to the host together, so that a GPU is waited for once per batch.

Each read of a GPU tensor from the host (`.tolist()`, `.cpu()`) waits for everything queued on the device before
it; on the one CUDA stream both stage threads share, that includes the other thread's work. Track, assign and
composite need a few numbers per instance on the host: they read a whole batch's with one copy.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_host(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors (one device, one dtype, any shapes, empty ones too) as CPU tensors of the same shapes, in one
    device-to-host copy: flattened, concatenated, copied, split back."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
