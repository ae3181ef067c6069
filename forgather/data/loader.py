"""Loading order: a shuffling sampler that is a pure function of (seed, epoch), and a DataLoader that can
start a pass part-way through (to resume a run mid-epoch).

`EpochShuffleSampler(num_samples, seed)` yields `torch.randperm(num_samples)` drawn from a generator seeded
with `seed + epoch x 0x9E3779B9` (mod 2^32, the bits torch's CPU generator keeps): epoch 0 is seeded with
`seed` itself, and another seed's epoch never repeats this one's order (with `seed + epoch`, seed 1's first
epoch was seed 0's second, so a sweep over seeds shared its orders). Lightning calls `set_epoch` at every epoch
start (and forwards it through the DistributedSamplerWrapper it puts around custom samplers under DDP), so every
rank sees the same permutation, reruns repeat it, and a resumed run replays the same epoch's order. No global
RNG is used.

`EvenShareSampler(num_samples, num_replicas, rank)` is an evaluation set's share of one data-parallel rank:
positions rank, rank + R, ..., every rank given as many (ceil(n / R)), so that all run the same number of
batches (a sharded model's forward is a collective, and so is DDP's broadcast of buffers). Where R does not
divide n, a share past the end is filled with `padding_index(i)`: row i again, which the datasets (PackedDataset,
PackedShards) give with every label ignored, so a token-weighted metric (val/loss) counts each row once and equals
one process's. (Lightning's DistributedSampler fills the shares with rows again, which it counts twice.)

`ResumableDataLoader(..., position=LoaderPosition())` is a DataLoader with Lightning's stateful-loader
interface: `state_dict()` is the shared `position` (epoch, batches consumed in it), which the owner advances
as batches reach the training step (TextDataModule does it in `on_before_batch_transfer`; counting inside
the loader would also count batches Lightning has only prefetched). Lightning stores it in checkpoints and
calls `load_state_dict()` on resume; the next pass, if it is that epoch (the sampler's `epoch` when the
first batch is drawn, after `set_epoch`), then skips the consumed batches. Skipping happens after sampling
and sharding, so it means "k batches of this rank" under any sampler or DDP wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


# 2^32 / the golden ratio: consecutive epochs' seeds lie far apart, and no small difference of seeds is a
# multiple of it for a small difference of epochs
_EPOCH_STRIDE = 0x9E3779B9


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
        generator = torch.Generator().manual_seed((self.seed + self.epoch * _EPOCH_STRIDE) % 2**32)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def padding_index(row: int) -> int:
    """The index under which a dataset gives `row` as padding: its labels all ignored (a negative number)."""
    return -1 - row


class EvenShareSampler(DistributedSampler):
    """An evaluation set's share of one data-parallel rank, padded to every rank's length (module docstring).
    A DistributedSampler, so Lightning takes it as the share and does not put its own around it."""

    def __init__(self, num_samples: int, num_replicas: int, rank: int):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples_total = num_samples
        self.num_samples = -(-num_samples // num_replicas)

    def __iter__(self) -> Iterator[int]:
        n, ranks = self.num_samples_total, self.num_replicas
        positions = range(self.rank, self.num_samples * ranks, ranks)
        return iter([p if p < n else padding_index(p % n) for p in positions])

    def __len__(self) -> int:
        return self.num_samples


@dataclass
class LoaderPosition:
    """How far training got: the epoch and the number of its batches consumed so far."""

    epoch: int = 0
    batches: int = 0

    def advance(self, epoch: int) -> None:
        """One more batch of `epoch` was consumed."""
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position survives checkpoints (see the module docstring)."""

    def __init__(self, *args: Any, position: LoaderPosition | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.position = position if position is not None else LoaderPosition()
        self._resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batches": self.position.batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position.epoch, self.position.batches = state_dict["epoch"], state_dict["batches"]
        self._resume_at = (state_dict["epoch"], state_dict["batches"])

    def __iter__(self) -> Iterator[Any]:
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        # A generator, so the pass starts when the first batch is requested. A resumed Lightning fit calls iter()
        # on the loader before set_epoch, and a DataLoader with workers draws its first indices from the sampler
        # inside iter(): started there, a run resumed in epoch 1 or later would train on epoch 0's order. The
        # resume point is taken here too, so an iter() whose pass never starts does not use it up.
        resume_at, self._resume_at = self._resume_at, None
        resumes = resume_at is not None and resume_at[0] == getattr(self.sampler, "epoch", 0)
        yield from self._batches_after(resume_at[1] if resumes else 0)

    def _batches_after(self, consumed: int) -> Iterator[Any]:
        """This epoch's batches after the first `consumed`."""
        iterator = super().__iter__()
        # Drawing the skipped batches (not slicing the sampler) keeps every sampler and DDP shard exact.
        for _ in range(consumed):
            next(iterator, None)
        return iterator
