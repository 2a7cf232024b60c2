"""Samplers: unpadded sharding for evaluation, resumable seeded shuffling for training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank `r` of `n` gets indices `r, r + n, r + 2n, ...`: every sample exactly once over all ranks.

    Ranks may get one sample more than others (unlike `DistributedSampler`, which pads by
    repeating samples). Being a `DistributedSampler`, Lightning leaves it in place instead of
    injecting its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,
            drop_last=False,
        )
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))
        self.total_size = len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableDistributedSampler(DistributedSampler):
    """The training sampler: shuffled per epoch, sharded over ranks, resumable mid-epoch, and giving
    every sample its own augmentation seed.

    It yields ``(index, seed)`` pairs. The order is a permutation drawn from ``(seed, epoch)``,
    padded by repetition to a multiple of the world size as ``DistributedSampler`` does, so every
    rank runs the same number of steps. The per-sample seed depends only on ``(seed, epoch,
    index)``, so an augmentation is the same whichever process, worker or resumed run draws it.

    ``resume(epoch, consumed)``: the next iteration over ``epoch`` starts after its first
    ``consumed`` samples of this rank (the data module calls it when a checkpoint is restored).
    Works without ``torch.distributed`` (one replica, rank 0).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1),
            rank=rank if rank is not None else (dist.get_rank() if distributed else 0),
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self._resume_at: tuple[int, int] | None = None

    def resume(self, epoch: int, consumed: int) -> None:
        self._resume_at = (epoch, consumed)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = len(self.dataset)
        order = torch.randperm(size, generator=generator) if self.shuffle else torch.arange(size)
        sample_seeds = torch.randint(0, 2**31 - 1, (size,), generator=generator)
        order = order.tolist()
        if size:  # pad by repetition to total_size, a multiple of the world size
            order = (order * math.ceil(self.total_size / size))[: self.total_size]
        mine = order[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self._resume_at is not None:
            resume_epoch, consumed = self._resume_at
            if resume_epoch == self.epoch:
                start = consumed
            self._resume_at = None
        return iter([(index, int(sample_seeds[index])) for index in mine[start:]])
