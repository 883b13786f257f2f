"""to_host: a batch's per-frame tensors on the host, same shapes and values, in one device-to-host copy."""
from __future__ import annotations

import torch

from pipeline.host_copy import to_host
from tests.helpers_cuda import gpu_waits


def test_shapes_and_values_come_back_in_one_copy(device):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(3, 6, generator=g), torch.zeros(0, 6), torch.rand(2, 4, 5, generator=g),
               torch.rand(7, generator=g)]
    on_device = [t.to(device) for t in tensors]
    on_device.insert(1, None)  # a frame with nothing to read
    host, waits = gpu_waits(device, lambda: to_host(on_device))
    assert host[1] is None
    del host[1]
    assert [h.shape for h in host] == [t.shape for t in tensors]
    assert all(h.device.type == "cpu" and torch.equal(h, t) for h, t in zip(host, tensors))
    assert waits is None or waits == 1
    assert to_host([]) == [] and to_host([None, None]) == [None, None]
