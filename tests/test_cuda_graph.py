"""gpu/cuda_graph.py: graphs replay what the function computes, also when two threads capture at once."""
from __future__ import annotations

import threading

import pytest
import torch

from gpu.cuda_graph import GraphCache


def _net(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(torch.tanh(x * 1.5 + 0.25), 3, stride=1, padding=1).sum(dim=1)


def _capture_many_shapes(seed: int, errors: list, start: threading.Barrier) -> None:
    """Like one of the render's model threads: its own stream, a graph per new input shape, each batch synced."""
    try:
        stream = torch.cuda.Stream()
        cache = GraphCache(_net, max_graphs=64, after_calls=1)
        generator = torch.Generator(device="cuda").manual_seed(seed)
        start.wait()
        with torch.cuda.stream(stream):
            for side in range(8, 40):
                x = torch.rand(2, 3, side, side + seed, device="cuda", generator=generator)
                graph = cache.lookup(x.shape, lambda: (x.clone(),))
                got = graph.replay(x)[0].clone()
                stream.synchronize()  # as each stage's timing ends (pipeline/stage_timing.py)
                torch.testing.assert_close(got, _net(x)[0])
    except BaseException as error:  # noqa: BLE001 - reported by the main thread
        errors.append(error)


def test_two_threads_capturing_at_once_both_replay_their_function(device):
    """The render's segment thread captures its front while the stylize thread captures the style net
    (style.cuda_graphs=true): unserialized, the second capture's start failed on an H200 (GPU session 7)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    errors: list = []
    start = threading.Barrier(2)
    threads = [threading.Thread(target=_capture_many_shapes, args=(seed, errors, start)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors[0]
