"""An endless, resumable stream of training batches.

Each epoch's order is a function of (seed, epoch) only: a DistributedSampler (one shard per process, shuffled
with seed + epoch) feeds a batch sampler (aspect-ratio grouping in practice). The stream counts the batches the
training loop has taken, not the ones workers have prefetched, so a checkpoint's position is exact and a resumed
run skips precisely the batches already trained on.

Augmentation draws from the global RNGs of whichever process loads a sample: a DataLoader worker's, whose state no
checkpoint can hold, or the training process's, shared with the model's sampling. So each sample is loaded with
those RNGs seeded from (seed, rank, epoch, batch, place in the batch) and restored afterwards: its random flip or
scale is the same with or without workers, in an uninterrupted run and in a resumed one.
"""
from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from segment.errors import ConfigError
from segment.workers import quiet_worker, starting_workers

BatchSamplerFactory = Callable[[Sampler], Iterable[list[int]]]
SampleKey = tuple[int, int]  # (index into the dataset, seed of the sample's augmentation)


@contextlib.contextmanager
def _rngs_seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's global CPU RNGs seeded with `seed` inside, as they were outside."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed the model's CUDA RNGs as well
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class _SeededSamples(Dataset):
    """`dataset[index]` loaded with the RNGs seeded by the key's seed (see the module's docstring)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        index, seed = key
        with _rngs_seeded(seed):
            return self.dataset[index]


class _EpochBatches:
    """The batches of `epoch`, from batch `start` on, as keys of `_SeededSamples`; what the DataLoader iterates
    each time it is restarted."""

    def __init__(self, sampler: DistributedSampler, batches: Iterable[list[int]], seed: int, rank: int) -> None:
        self.sampler = sampler
        self.batches = batches
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.epoch
        self.sampler.set_epoch(epoch)
        batches = itertools.islice(iter(self.batches), self.start, None)
        return (self._keys(epoch, number, batch) for number, batch in enumerate(batches, self.start))

    def _keys(self, epoch: int, number: int, batch: list[int]) -> list[SampleKey]:
        # by place, not by image: a grouped batch sampler may repeat an image within an epoch
        entropy = [self.seed % 2**64, self.rank, epoch, number]
        return [(index, int(np.random.SeedSequence([*entropy, place]).generate_state(1, np.uint64)[0]))
                for place, index in enumerate(batch)]

    def __len__(self) -> int:
        return max(len(self.batches) - self.start, 0)


class BatchStream:
    """`next(stream)` -> one collated batch, forever; `state_dict()` / `load_state_dict()` hold the position."""

    def __init__(
        self, dataset: Dataset, make_batches: BatchSamplerFactory, collate_fn: Callable[[list], Any], *,
        seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
    ) -> None:
        if len(dataset) < world_size:
            raise ConfigError(f"the training set has {len(dataset)} images, fewer than the {world_size} processes")
        self.seed = int(seed)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        self._batches = _EpochBatches(sampler, make_batches(sampler), self.seed, rank)
        if len(self._batches.batches) == 0:
            raise ConfigError(
                f"the training set's {len(dataset)} images give no full batch per process (lower batch_size)"
            )
        # a private generator: starting an iterator must not draw from the global RNG the model samples with
        self._generator = torch.Generator()
        self._loader = DataLoader(
            _SeededSamples(dataset), batch_sampler=self._batches, collate_fn=collate_fn, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=self._generator,
            worker_init_fn=quiet_worker,
        )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterator: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches.batches)

    def _restart(self) -> None:
        self._batches.epoch, self._batches.start = self.epoch, self.batch_in_epoch
        self._generator.manual_seed(self.seed * 100003 + self.epoch)  # worker seeds depend on the epoch only
        with starting_workers():  # the first time: their stop signals are the training's (segment/workers.py)
            self._iterator = iter(self._loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._restart()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._restart()
            batch = next(self._iterator)
        self.batch_in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._iterator = None  # the next batch comes from a loader restarted at this position
