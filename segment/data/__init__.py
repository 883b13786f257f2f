"""Training data: COCO-format datasets, augmentation, batching, and the synthetic shapes generator.

`build_dataset(cfg, split)` / `build_dataloader(cfg, split, batch_size)` read the Hydra `data` group
(conf/data/*.yaml); see there for what each key does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from segment.data.coco import CocoDetection
from segment.data.errors import DatasetError
from segment.data.sampler import GroupedBatchSampler, aspect_ratio_groups, collate
from segment.data.transforms import build_transforms

SPLITS = ("train", "val")

__all__ = [
    "CocoDetection", "DatasetError", "GroupedBatchSampler", "aspect_ratio_groups", "build_dataloader",
    "build_dataset", "build_transforms", "collate", "set_epoch",
]


def build_dataset(cfg: Any, split: str) -> CocoDetection:
    """The `split` ("train" | "val") dataset of a data config: `<split>.images` / `<split>.annotations` paths,
    optional `category_ids`, `resize.min_size` / `resize.max_size`, `hflip_prob` (train only), `drop_empty`
    (train only). With a `generate_if_missing` block (synthetic data) a missing split is generated first."""
    if split not in SPLITS:
        raise DatasetError(f"unknown data split {split!r} (use one of {', '.join(SPLITS)})")
    paths = cfg[split]
    annotations = Path(paths["annotations"])
    generate = cfg.get("generate_if_missing")
    if generate and not annotations.is_file():
        from segment.data.synthetic import write_coco_split

        written = write_coco_split(cfg["root"], split, int(generate[f"n_{split}"]), int(generate["size"]),
                                   int(generate["seed"]))
        if written.resolve() != annotations.resolve():
            raise DatasetError(f"data.{split}.annotations is {annotations} but generated data lands in {written}")
    train = split == "train"
    resize = cfg.get("resize") or {}
    min_size = resize.get("min_size")
    if min_size is not None and not isinstance(min_size, int):
        min_size = tuple(int(s) for s in min_size)
    transforms = build_transforms(train, min_size=min_size, max_size=resize.get("max_size"),
                                  hflip_prob=float(cfg.get("hflip_prob", 0.0)))
    category_ids = cfg.get("category_ids")
    return CocoDetection(
        paths["images"], annotations, transforms=transforms,
        category_ids=list(category_ids) if category_ids is not None else None,
        drop_empty=train and bool(cfg.get("drop_empty", False)),
    )


def build_dataloader(
    cfg: Any, split: str, batch_size: int, distributed: bool = False, seed: int = 0,
    dataset: CocoDetection | None = None,
) -> DataLoader:
    """DataLoader yielding (list of images, list of targets). Training shuffles (DistributedSampler under DDP),
    batches by aspect ratio when `aspect_grouping` is on, and drops the last partial batch; validation keeps
    order and every image. Workers: `num_workers`. Call `set_epoch(loader, epoch)` each epoch."""
    dataset = dataset if dataset is not None else build_dataset(cfg, split)
    train = split == "train"
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    if train and cfg.get("aspect_grouping", False):
        batch_sampler = GroupedBatchSampler(sampler, aspect_ratio_groups(dataset), batch_size)
    else:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=train and len(sampler) >= batch_size)
    workers = int(cfg.get("num_workers", 0))
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffles a distributed loader for `epoch` (no-op otherwise)."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
