"""Samplers: unpadded sharding for evaluation, resumable seeded shuffling for training, and the
repeat-factor variant of the latter that shows images of rare classes more often."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
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

    def epoch_samples(self) -> tuple[list[int], list[int]]:
        """The epoch's dataset indices in order and their augmentation seeds, before padding and sharding."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = len(self.dataset)
        order = torch.randperm(size, generator=generator) if self.shuffle else torch.arange(size)
        sample_seeds = torch.randint(0, 2**31 - 1, (size,), generator=generator)
        order = order.tolist()
        return order, sample_seeds[order].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.epoch_samples()
        pairs = list(zip(order, seeds))
        if pairs:  # pad by repetition to total_size, a multiple of the world size
            pairs = (pairs * math.ceil(self.total_size / len(pairs)))[: self.total_size]
        mine = pairs[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self._resume_at is not None:
            resume_epoch, consumed = self._resume_at
            if resume_epoch == self.epoch:
                start = consumed
            self._resume_at = None
        return iter(mine[start:])


def _presence(box_offsets: np.ndarray, box_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """bool (num_images, num_classes): whether image i holds a box of class c."""
    num_images = len(box_offsets) - 1
    image_of_box = np.repeat(np.arange(num_images), np.diff(box_offsets))  # (num_boxes,)
    present = np.zeros((num_images, num_classes), dtype=bool)
    present[image_of_box, box_labels] = True
    return present


def class_repeat_factors(
    box_offsets: np.ndarray, box_labels: np.ndarray, num_classes: int, threshold: float
) -> np.ndarray:
    """float64 (num_classes,): r_c = max(1, sqrt(t / f_c)), f_c the fraction of images holding a box of class c
    (inf for a class without boxes). Arguments as `repeat_factors`."""
    if threshold <= 0:
        raise ValueError(f"repeat_threshold must be positive, got {threshold}")
    present = _presence(box_offsets, box_labels, num_classes)
    frequency = present.sum(axis=0) / max(len(present), 1)  # (num_classes,) f_c
    with np.errstate(divide="ignore"):
        return np.maximum(1.0, np.sqrt(threshold / frequency))


def repeat_factors(box_offsets: np.ndarray, box_labels: np.ndarray, num_classes: int, threshold: float) -> np.ndarray:
    """LVIS's repeat factor of every image (Gupta et al. 2019; detectron2's `RepeatFactorTrainingSampler`,
    mmdetection's `ClassBalancedDataset`): the largest `class_repeat_factors` r_c of the image's classes, 1 for an
    image without boxes.

    Args:
        box_offsets: int64 (num_images + 1,) into `box_labels`, as `DetectionRecords.box_offsets`.
        box_labels: int64 (num_boxes,) head index of every box.
        num_classes: number of head indices.
        threshold: t; classes in fewer than this fraction of the images are repeated.

    Returns:
        float64 (num_images,) repeat factors, each >= 1.
    """
    class_factor = class_repeat_factors(box_offsets, box_labels, num_classes, threshold)  # (num_classes,)
    present = _presence(box_offsets, box_labels, num_classes)  # (num_images, num_classes)
    return np.where(present, class_factor[None, :], 1.0).max(axis=1, initial=1.0)


class RepeatFactorSampler(ResumableDistributedSampler):
    """`ResumableDistributedSampler` over a repeated epoch: image i appears floor(r_i) times plus once more
    with probability frac(r_i) (stochastic rounding drawn per epoch from ``(seed, epoch)``), shuffled.

    The number of samples drawn varies from epoch to epoch; the epoch's length is fixed once per run to that
    of epoch 0's draw (from ``seed``): a longer draw is cut after shuffling, a shorter one continued from its
    start. So ``len(sampler)``, the step-sized learning-rate schedule and mid-epoch resume stay exact, and the
    ranks share every epoch disjointly (padded to a multiple of the world size as the parent does). Each
    position of the epoch has its own augmentation seed, so the repeats of an image are augmented differently.

    Args:
        dataset: the training dataset.
        factors: float (len(dataset),) repeat factors (`repeat_factors`).
        num_replicas, rank, shuffle, seed: as `ResumableDistributedSampler`.
    """

    def __init__(
        self,
        dataset: Dataset,
        factors: np.ndarray,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.factors = np.asarray(factors, dtype=np.float64)
        if self.factors.shape != (len(dataset),) or not np.all(self.factors >= 1):
            raise ValueError(f"need one repeat factor >= 1 per image ({len(dataset)}), got shape {self.factors.shape}")
        self.epoch_length = len(self._repeated(torch.Generator().manual_seed(self.seed)))
        self.num_samples = math.ceil(self.epoch_length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def _repeated(self, generator: torch.Generator) -> torch.Tensor:
        """int64 (num_drawn,): every index repeated floor(r) times plus one with probability frac(r)."""
        factors = torch.from_numpy(self.factors)
        whole = torch.floor(factors)
        extra = torch.rand(len(factors), generator=generator, dtype=torch.float64) < factors - whole
        counts = (whole + extra).to(torch.int64)  # (num_images,)
        return torch.repeat_interleave(torch.arange(len(factors)), counts)

    def epoch_samples(self) -> tuple[list[int], list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = self._repeated(generator)
        if self.shuffle:
            drawn = drawn[torch.randperm(len(drawn), generator=generator)]
        order = drawn.repeat(math.ceil(self.epoch_length / max(len(drawn), 1)))[: self.epoch_length].tolist()
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=generator).tolist()
        return order, seeds
