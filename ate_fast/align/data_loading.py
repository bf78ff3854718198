"""What the trainers and the prior accept as ``data``, turned into batches.

``data`` may be an :class:`~ate_fast.data.ActionChunkDataset` (items ``(chunk, mask)``, or
``(chunk, mask, steps)`` with ``step_mask=True``), any dataset of ``(chunk [H, D], mask
[D])`` pairs, ``(chunk, mask, steps [H])`` triples (``steps``: 1 on a real step, 0 on
padding) or bare chunks ``[H, D]``, or a tensor ``[N, H, D]`` (e.g. chunks sampled from
the pre-trained policy when its data is not available).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

Batch = tuple[Tensor, Optional[Tensor], Optional[Tensor]]


def as_dataset(data: Any) -> Dataset:
    """A ``Dataset`` for ``data`` (a tensor ``[N, H, D]`` becomes a ``TensorDataset``)."""
    if isinstance(data, Tensor):
        if data.dim() != 3:
            raise ValueError(f"data: a tensor must be [N, H, D], got {tuple(data.shape)}")
        return TensorDataset(data.float())
    if isinstance(data, Dataset):
        return data
    raise TypeError(f"data: expected a Dataset or a [N, H, D] tensor, got {type(data).__name__}")


def collate_chunks(items: Sequence[Any]) -> Batch:
    """Stack items into ``(chunks [B, H, D], masks [B, D] or None, steps [B, H] or None)``."""
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(list(items)), None, None
    if isinstance(first, (tuple, list)) and 1 <= len(first) <= 3:
        if any(len(it) != len(first) for it in items):
            raise TypeError("data: items of one batch must all have the same number of parts")
        parts = [torch.stack([it[i] for it in items]) for i in range(len(first))]
        return tuple(parts + [None] * (3 - len(parts)))  # type: ignore[return-value]
    raise TypeError(
        "data: items must be a chunk [H, D], a pair (chunk [H, D], mask [D]) or a triple "
        f"(chunk [H, D], mask [D], steps [H]), got {type(first).__name__}"
        + (f" of {len(first)}" if isinstance(first, (tuple, list)) else "")
    )


def iterate_batches(data: Any, batch_size: int) -> Iterator[Batch]:
    """Every item once, in order, in batches of ``batch_size`` (the last may be smaller)."""
    loader = DataLoader(
        as_dataset(data), batch_size=batch_size, shuffle=False, collate_fn=collate_chunks
    )
    yield from loader


class WorkerSeededItems(Dataset):
    """``dataset``, each item fetched in a loader worker with torch's, NumPy's and Python's
    global generators seeded from ``(seed, epoch, index)``.

    A worker's generators otherwise start from a seed its loader draws when each epoch's
    iterator starts, then run on over the worker's share of the items. A resumed run deals
    the remaining items to fresh workers, so a dataset that draws random numbers
    (augmentation) would draw other numbers than in the uninterrupted run. Seeded per item,
    the draws depend on neither the resume point nor the number of workers. Set
    :attr:`epoch` before each epoch's iterator starts (the workers copy the dataset then).
    In the main process (``num_workers=0``) items are fetched as they are: the trainer's
    saved RNG state covers them there.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            words = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
            torch.manual_seed(int(words[0]) << 32 | int(words[1]))
            np.random.seed(words[0])  # noqa: NPY002 (the global state is what datasets draw from)
            random.seed(int(words[1]))
        return self.dataset[index]
