"""gpu/transfer.py: host tensors and row indices reach the device with the same values, and the host does not
wait for the GPU to get them there."""
from __future__ import annotations

import torch

from gpu.transfer import row_index, to_device
from tests.helpers_cuda import gpu_waits


def test_values_arrive_without_a_wait(device):
    g = torch.Generator().manual_seed(0)
    table = torch.rand(6, 5, generator=g)
    on_device = table.to(device)
    busy = torch.rand(256, 256, device=device)

    row = table[0].expand(4, -1)  # stride 0: one row repeated (a style's weights for a batch of frames)

    def copies():
        busy @ busy  # work already queued, which a waiting copy would have to wait for
        return (to_device(table, device), to_device(row, device), on_device[row_index([4, 1, 3], device)],
                on_device[row_index([2, 3], device)])

    copies()  # untimed once: the pinned memory pool
    (moved, rows, picked, sliced), waits = gpu_waits(device, copies)
    assert moved.device.type == device.type and torch.equal(moved.cpu(), table)
    assert torch.equal(rows.cpu(), row)
    assert torch.equal(picked.cpu(), table[[4, 1, 3]])
    assert torch.equal(sliced.cpu(), table[2:4])
    assert row_index([2, 3], device) == slice(2, 4) and row_index([], device) == slice(0, 0)
    assert waits is None or waits == 0
