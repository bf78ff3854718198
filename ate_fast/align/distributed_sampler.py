"""A ``DistributedSampler`` that can resume part-way through an epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (permutation from ``seed + epoch``, rank ``r`` takes every
    ``world``-th index) that skips the first ``skip`` of this rank's indices.

    With one process (``num_replicas=1``) it is a seeded shuffle. Resuming at batch ``k``
    of an epoch is ``set_epoch(epoch, skip=k * per_rank_batch)``: the same remaining
    indices in the same order as the uninterrupted run.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip: expected 0..{self.num_samples}, got {skip}")
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip
