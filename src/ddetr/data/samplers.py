"""A distributed sampler for evaluation that neither pads nor duplicates."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank `r` of `n` gets indices `r, r + n, r + 2n, ...`: every sample exactly once over all ranks.

    Ranks may get one sample more than others (unlike `DistributedSampler`, which pads by
    repeating samples). Being a `DistributedSampler`, Lightning leaves it in place instead of
    injecting its own.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None
    ):
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
