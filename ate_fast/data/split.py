"""Train/validation split that keeps episodes whole.

Chunks cut from one episode overlap almost entirely at stride 1, so a random chunk split
would validate on the training data; splitting by episode does not.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


def train_val_split(
    dataset: Dataset, val_fraction: float, seed: int = 0
) -> tuple[Dataset, Optional[Dataset]]:
    """Split into ``(train, val)``; ``val`` is ``None`` when ``val_fraction`` is 0.

    If the dataset has ``episode_of_chunk`` and at least two episodes, a random
    ``val_fraction`` of the episodes (at least one, never all) goes to validation;
    otherwise a random ``val_fraction`` of the items.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    n = len(dataset)
    if val_fraction == 0.0 or n < 2:
        return dataset, None
    gen = torch.Generator().manual_seed(seed)
    episodes = getattr(dataset, "episode_of_chunk", None)
    if episodes is not None and len(np.unique(episodes)) >= 2:
        ids = np.unique(episodes)
        n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
        perm = torch.randperm(len(ids), generator=gen).numpy()
        val_ids = ids[perm[:n_val]]
        is_val = np.isin(episodes, val_ids)
    else:
        if episodes is not None:  # one episode: nothing to hold out whole
            warnings.warn(
                "train_val_split: the data is one episode, so validation takes random chunks "
                "of it, which overlap training chunks: the validation loss is not held out "
                "(mark the episodes in the data, or pass val_fraction=0)",
                UserWarning,
                stacklevel=2,
            )
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        is_val = np.zeros(n, dtype=bool)
        is_val[torch.randperm(n, generator=gen).numpy()[:n_val]] = True
    return (
        Subset(dataset, np.flatnonzero(~is_val).tolist()),
        Subset(dataset, np.flatnonzero(is_val).tolist()),
    )
