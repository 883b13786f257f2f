"""Training data: COCO-format datasets, augmentation, batching, and the synthetic shapes generator.

`build_dataset(cfg, split)` / `build_dataloader(cfg, split, batch_size)` read the Hydra `data` group
(conf/data/*.yaml); see there for what each key does.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from common.errors import SettingError
from common.settings import check_settings, flag, whole
from segment.data.coco import CocoDetection
from segment.data.errors import DatasetError
from segment.data.sampler import GroupedBatchSampler, aspect_ratio_groups, collate
from segment.data.transforms import build_transforms

SPLITS = ("train", "val")
GENERATE_KEYS = ("n_train", "n_val", "size", "seed")  # a generate_if_missing block's settings
# the data group's settings (conf/data/*.yaml), and those of its blocks but generate_if_missing: any other is a typo
DATA_KEYS = ("root", *SPLITS, "generate_if_missing", "category_ids", "resize", "hflip_prob", "drop_empty",
             "aspect_grouping", "num_workers")
BLOCK_KEYS = {**dict.fromkeys(SPLITS, ("images", "annotations")), "resize": ("min_size", "max_size")}
SYNTHETIC_MIN_SIZE = 32  # write_coco_split's smallest image side

__all__ = [
    "CocoDetection", "DatasetError", "GroupedBatchSampler", "aspect_ratio_groups", "build_dataloader",
    "build_dataset", "build_transforms", "check_data_settings", "collate", "data_flag", "set_epoch",
]


def check_data_settings(cfg: Any) -> None:
    """The data group's settings read as whole numbers, flags or lists, each refused in one line naming it: what
    segment.train checks before any work (a text `no` would read as true, `n_train=abc` fail only once the output
    folder is taken, a text category_ids be iterated by character). A key no reader knows (`+data.hflip=0`) is
    refused too: it trained as if it were not there."""
    check_settings(cfg, DATA_KEYS, "data")
    for block, known in BLOCK_KEYS.items():
        if isinstance(cfg.get(block), Mapping):
            check_settings(cfg[block], known, f"data.{block}")
    _generation(cfg)
    _category_ids(cfg)
    for key in ("drop_empty", "aspect_grouping"):
        data_flag(cfg, key, False)


def _generation(cfg: Any) -> dict[str, int] | None:
    """The `generate_if_missing` block's n_train / n_val / size / seed, checked (whole numbers: `size=64.9` was cut
    to 64, a negative seed a numpy error); None: never generate."""
    generate = cfg.get("generate_if_missing")
    if generate is None:
        return None
    if not isinstance(generate, Mapping):
        raise SettingError(f"data.generate_if_missing must be null or hold {', '.join(GENERATE_KEYS)}, "
                           f"got {generate!r}")
    check_settings(generate, GENERATE_KEYS, "data.generate_if_missing")
    lowest = {"size": SYNTHETIC_MIN_SIZE}
    return {key: whole(generate.get(key), f"data.generate_if_missing.{key}", lowest.get(key, 0))
            for key in GENERATE_KEYS}


def _category_ids(cfg: Any) -> list[int] | None:
    """`category_ids`: null (every category) or a list of COCO category ids."""
    ids = cfg.get("category_ids")
    if ids is None:
        return None
    if not isinstance(ids, (ListConfig, list, tuple)):
        raise SettingError(f"data.category_ids must be null or a list of category ids such as [1, 3], got {ids!r}")
    return [whole(cid, f"data.category_ids.{i}", -math.inf) for i, cid in enumerate(ids)]


def data_flag(cfg: Any, key: str, default: bool) -> bool:
    """A true / false setting of the data group (`default` where the group lacks it)."""
    return flag(cfg.get(key, default), f"data.{key}")


def build_dataset(cfg: Any, split: str) -> CocoDetection:
    """The `split` ("train" | "val") dataset of a data config: `<split>.images` / `<split>.annotations` paths,
    optional `category_ids`, `resize.min_size` / `resize.max_size`, `hflip_prob` (train only), `drop_empty`
    (train only). With a `generate_if_missing` block (synthetic data) a missing split is generated first."""
    if split not in SPLITS:
        raise DatasetError(f"unknown data split {split!r} (use one of {', '.join(SPLITS)})")
    paths = cfg[split]
    annotations = Path(paths["annotations"])
    generate = _generation(cfg)
    if generate is not None and not annotations.is_file():
        from segment.data.synthetic import write_coco_split

        written = write_coco_split(cfg["root"], split, generate[f"n_{split}"], generate["size"], generate["seed"])
        if written.resolve() != annotations.resolve():
            raise DatasetError(f"data.{split}.annotations is {annotations} but generated data lands in {written}")
    train = split == "train"
    resize = cfg.get("resize") or {}
    min_size = resize.get("min_size")
    if min_size is not None and not isinstance(min_size, int):
        min_size = tuple(int(s) for s in min_size)
    transforms = build_transforms(train, min_size=min_size, max_size=resize.get("max_size"),
                                  hflip_prob=float(cfg.get("hflip_prob", 0.0)))
    return CocoDetection(paths["images"], annotations, transforms=transforms, category_ids=_category_ids(cfg),
                         drop_empty=train and data_flag(cfg, "drop_empty", False))


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
    if train and data_flag(cfg, "aspect_grouping", False):
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
