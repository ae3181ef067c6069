"""Deterministic train/validation split by document.

`split_documents(items, val_fraction, seed)` draws `round(val_fraction * n)` items for validation (at least
one when the fraction is positive and there are two or more items; never all of them) with a
`random.Random(seed)`; both parts keep the input order. Whole documents go to one side, so no document is
shared between training and validation. Torch-free.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

Item = TypeVar("Item")


def split_documents(items: Sequence[Item], val_fraction: float, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train, validation) parts of `items`, disjoint, covering every item, reproducible from `seed`."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_indices = set(random.Random(seed).sample(range(len(items)), _validation_size(len(items), val_fraction)))
    train = [item for index, item in enumerate(items) if index not in val_indices]
    val = [item for index, item in enumerate(items) if index in val_indices]
    return train, val


def _validation_size(count: int, val_fraction: float) -> int:
    if count < 2 or val_fraction == 0:
        return 0
    return min(max(round(val_fraction * count), 1), count - 1)
