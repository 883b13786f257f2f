"""segment/distributed.py: the process's current GPU is the one it trains on, with or without torchrun."""
from __future__ import annotations

import pytest
import torch

import segment.distributed
from segment.distributed import init_distributed


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_training_on_a_named_gpu_makes_it_the_current_one(monkeypatch, world_size):
    """`device=cuda:1` in one process left GPU 0 current: the DataLoader pins memory on, and its pin thread opens
    a CUDA context on, the current GPU (torch/utils/data/dataloader.py), so GPU 0 got both."""
    current = []
    monkeypatch.setattr(segment.distributed, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(segment.distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(segment.distributed.dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = init_distributed("cuda:1" if world_size == "1" else "cuda")
    assert info.device == torch.device("cuda:1") and current == [info.device]


def test_a_cpu_training_leaves_the_current_gpu_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device on a CPU run"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu").device == torch.device("cpu")
