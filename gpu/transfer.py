"""Host-to-GPU copies that leave the host free to go on queueing work.

A plain `.to("cuda")` of a host tensor copies from pageable memory and then waits until the stream has finished
everything queued before it; so does indexing a GPU tensor with a Python list, whose index torch builds on the host
and copies that way. In a stage that queues one network call after another, such a wait between two calls stops
the host until the GPU has caught up, and the GPU then idles while the host prepares the next call. Copied from
pinned memory with `non_blocking`, the copy is queued on the stream like a kernel; the caching host allocator keeps
the pinned buffer until the copy has run.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`: from the host to a GPU without waiting for the stream, otherwise `tensor.to(device)`."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        if any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape)):
            tensor = tensor.contiguous()  # pinning keeps the strides: an expanded tensor would be copied onto itself
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def row_index(rows: list[int], device: torch.device) -> slice | Tensor:
    """Rows as a slice where they are consecutive (no index tensor to copy), else as an index on `device`, copied
    without waiting for the stream."""
    first = rows[0] if rows else 0
    if rows == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return to_device(torch.tensor(rows), device)


def to_device_all(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """Host tensors of one dtype (any shapes) on `device` in one copy: flattened, concatenated, copied (as
    `to_device`), split back into views of the shapes they had."""
    flat = to_device(torch.cat([t.reshape(-1) for t in tensors]), device)
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
