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


@pytest.mark.parametrize("name", ["meta", "mps", "xpu:0"])
def test_a_device_type_nothing_runs_on_is_refused(name):
    """torch names more device types than cpu and cuda: a run on `meta` computes nothing, one on `mps` fails at the
    first tensor moved there, after the set-up."""
    from common.device import resolve_device
    from common.errors import SettingError

    with pytest.raises(SettingError, match=rf"^device must be auto, cpu, cuda or cuda:N, got '{name}'$"):
        resolve_device(name)


def test_a_gpu_index_past_the_last_is_refused(monkeypatch):
    # GPUs count from 0: on a machine with one, cuda:1 is the first that is not there
    from common.device import resolve_device
    from common.errors import SettingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(SettingError, match=r"^device=cuda:1: this machine has 1 CUDA device\(s\)$"):
        resolve_device("cuda:1")
