"""Batching for detection: aspect-ratio grouping (portrait and landscape images in separate batches, so padding
to a common size wastes little) and a collate that keeps every image at its own size."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def aspect_ratio_groups(dataset) -> list[int]:
    """Group id per image: 0 for portrait (width / height < 1), 1 otherwise; sizes come from
    `dataset.get_height_and_width(i)` so no image is decoded."""
    groups = []
    for index in range(len(dataset)):
        height, width = dataset.get_height_and_width(index)
        groups.append(0 if width / height < 1 else 1)
    return groups


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices from `sampler` (e.g. a RandomSampler or DistributedSampler), each batch from
    one group. Always yields max(1, len(sampler) // batch_size) batches, so every DDP rank runs the same number
    of steps: the leftover of the fullest group is completed by repeating its own earlier indices (as
    torchvision's reference GroupedBatchSampler does); other leftovers wait for the next epoch's shuffle.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        expected = len(self)
        if expected == 0:
            return
        pending: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        produced = 0
        for index in self.sampler:
            group = self.group_ids[index]
            pending[group].append(index)
            seen[group].append(index)
            if len(pending[group]) == self.batch_size:
                yield pending.pop(group)
                produced += 1
                if produced == expected:
                    return
        for group in sorted(pending, key=lambda g: -len(pending[g]))[: expected - produced]:
            batch, pool = pending[group], seen[group]
            batch += [pool[i % len(pool)] for i in range(self.batch_size - len(batch))]
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return max(1, n // self.batch_size) if n else 0

    def set_epoch(self, epoch: int) -> None:
        """Forwards to a DistributedSampler (reshuffles per epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def collate(batch: list[tuple]) -> tuple[list, list]:
    """[(image, target), ...] -> ([images], [targets]); images keep their own sizes (the model pads them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
