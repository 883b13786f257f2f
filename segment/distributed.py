"""Process-group set-up for `torchrun` launches, and the few collectives training needs.

A plain `python -m segment.train` is a world of one: nothing is initialised and every helper is a no-op, so the
same code path serves one process and many.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda | cuda:N -> device; under torchrun each process takes the GPU of its local rank."""
    device = resolve_device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def init_distributed(device: str = "auto", timeout_minutes: float = 180.0) -> DistInfo:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; joins the process group (nccl on CUDA, gloo on CPU).

    `timeout_minutes` (conf/train.yaml's dist_timeout_min) is how long a collective waits for the other processes:
    the other ranks wait at a barrier for rank 0's whole evaluation, which on COCO val can outlast torch's
    default 30 minutes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if chosen.type == "cuda":  # alone too: what names no GPU (the loader's pinned memory, its thread) takes this one
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            **({"device_id": chosen} if chosen.type == "cuda" else {}),
        )
    return DistInfo(rank, world_size, local_rank, chosen)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier(device_ids=[info.device.index]) if info.device.type == "cuda" else dist.barrier()


def mean_over_processes(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise mean of a tensor across processes (the tensor itself when running alone)."""
    if not info.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision, seen by every rank (so all processes stop or continue together)."""
    if not info.distributed:
        return flag
    value = torch.tensor([int(flag)], device=info.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
