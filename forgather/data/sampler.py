"""A shuffling sampler whose order is a pure function of (seed, epoch).

`EpochShuffleSampler(num_samples, seed)` yields `torch.randperm(num_samples)` drawn from a generator seeded
with `seed + epoch`. Lightning calls `set_epoch` at every epoch start (and forwards it through the
DistributedSamplerWrapper it puts around custom samplers under DDP), so every rank sees the same
permutation, reruns repeat it, and a run resumed at epoch k replays epoch k's order. No global RNG is used.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Indices 0..num_samples-1 in a fresh, reproducible order every epoch."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())
