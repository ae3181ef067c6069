"""Packed blocks streamed from prepared shards (`forgather.data.prepare`), in a seeded order that resumes exactly.

`PackedShards(path, split, block_size)` is a map-style dataset of packed blocks. Each shard's documents are
concatenated and cut into ceil(tokens / block_size) blocks exactly as `forgather.data.packing.pack_documents`
packs a document list: `input_ids`, `position_ids` restarting at 0 at every document start and at the block
start (flex attention's document mask reads them), `labels` = input_ids with the pad filling the shard's last
block set to -100. Blocks never span two shards, so the shard order can change every epoch without
re-packing. A block is sliced out of its memory-mapped shard (`datasets.Dataset.from_file`); a process keeps
at most `open_shards` (8, the sampler's `mix`) shards mapped, so resident memory stays flat however large
the corpus. A shard the manifest lists but the directory lacks is an error when the dataset opens, and so is one
cut short (its file does not end with Arrow's end-of-stream marker); other damage is found when the shard is read,
one line naming it (from a DataLoader worker too: `forgather.errors.describe`).

`ShardOrderSampler` orders the blocks of an epoch (a negative seed is read modulo 2^64, as numpy seeds only from
non-negative integers): shards in a permutation drawn from (seed, epoch), cut into
groups of `mix` (8) shards, the blocks of each group in a permutation drawn from (seed, epoch, group); it holds
one group's permutation at a time. Mixing several shards matters: a corpus stored in order (the stdlib
corpus: topics, then modules by name; a crawl by site) would otherwise feed one region of it at a time. It is a `DistributedSampler`, so Lightning keeps it under DDP instead of wrapping it (its wrapper would
materialize the whole order in memory): rank r of R takes positions [r n, (r + 1) n) of the epoch's order,
n = N // R, a contiguous run of shard groups (ranks share at most the groups at the run's ends; every rank gets the
same number of blocks, and fewer than R are dropped per epoch). `skip` drops positions from the start
without reading them.

`BlockLoader` is the DataLoader for it (workers hand over one array a batch; see its docstring), and
`validation_loader` reads the validation split in shard order, so every evaluation sees the same blocks (the
Trainer's `limit_val_batches` fixes how many). `StreamingLoader` is the training `ResumableDataLoader`
(`forgather.data.loader`): on resume it tells the sampler to skip the consumed batches' blocks, where the
in-memory path draws and discards them (which would read the skipped part of the corpus again). With
workers every batch is still the one an uninterrupted run gets: batches are cut from the sampler's order
in the main process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from forgather.data.loader import LoaderPosition, ResumableDataLoader
from forgather.data.packing import BLOCK_FIELDS, IGNORE_INDEX
from forgather.data.prepare import read_manifest, require_datasets
from forgather.errors import UserError


# What an Arrow IPC stream ends with (a continuation marker and a zero length), as the writer of a shard closes it.
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _ends_whole(path: Path) -> bool:
    """Whether the shard file at `path` ends with the end-of-stream marker (8 bytes read, not the shard)."""
    try:
        with open(path, "rb") as file:
            if file.seek(0, 2) < len(_END_OF_STREAM):
                return False
            file.seek(-len(_END_OF_STREAM), 2)
            return file.read() == _END_OF_STREAM
    except OSError:
        return True  # unreadable: reading the shard names the problem in the OS's words


class PackedShards(Dataset):
    """Blocks of `block_size` tokens from the shards of one split of a prepared directory."""

    def __init__(self, path: str | Path, split: str, block_size: int, open_shards: int = 8):
        if block_size < 1:
            raise UserError(f"block_size must be positive, got {block_size}")
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.shards = manifest["shards"][split]
        # Checked now, not when the order reaches a missing shard hours into the run.
        missing = [shard["file"] for shard in self.shards if not (self.path / shard["file"]).is_file()]
        if missing:
            raise UserError(f"{self.path / missing[0]}: no such shard, though the manifest lists it ({len(missing)} of "
                            f"the {len(self.shards)} {split} shards are missing): a copy that left files out; copy "
                            f"them too, or prepare the corpus again, into a new directory or after deleting {self.path}")
        # A copy cut short too (a shard's file ends with Arrow's end-of-stream marker): found when the order
        # reached it, it stopped a run hours in, and under data parallelism on one rank only (the others blocked in
        # a collective).
        cut = next((shard["file"] for shard in self.shards if not _ends_whole(self.path / shard["file"])), None)
        if cut is not None:
            raise self._damaged(str(self.path / cut), "it ends before the end-of-stream marker its writer puts last: "
                                                      "cut short")
        self.pad_id = manifest["pad_id"]
        self.block_size = block_size
        self.open_shards = open_shards
        tokens = np.array([shard["tokens"] for shard in self.shards], dtype=np.int64)
        self.shard_blocks = -(-tokens // block_size)
        self.first_block = np.concatenate([[0], np.cumsum(self.shard_blocks)])
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.first_block[-1])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers open their own memory maps.
        return {**self.__dict__, "_open": OrderedDict()}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.__getitems__([index])
        return {name: torch.from_numpy(row[0]) for name, row in zip(BLOCK_FIELDS, rows, strict=True)}

    def __getitems__(self, indices: Sequence[int]) -> np.ndarray:
        """The blocks at `indices` as one int64 array [3 (BLOCK_FIELDS), len(indices), block_size]; a negative
        index is a padding row of an evaluation share (forgather.data.loader.EvenShareSampler): block -1 - index,
        its labels ignored."""
        indices = np.asarray(indices, dtype=np.int64)
        padding = indices < 0
        indices = np.where(padding, -1 - indices, indices)
        outside = indices[indices >= len(self)]
        if outside.size:
            raise IndexError(f"block {outside[0]} out of range ({len(self)} blocks)")
        shards = np.searchsorted(self.first_block, indices, side="right") - 1
        rows = np.empty((len(BLOCK_FIELDS), len(indices), self.block_size), dtype=np.int64)
        # One vectorized pass per shard the batch touches (at most the sampler's `mix`).
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            rows[:, where] = self._blocks(int(shard), indices[where] - self.first_block[shard])
        rows[BLOCK_FIELDS.index("labels"), padding] = IGNORE_INDEX
        return rows

    def _blocks(self, shard: int, blocks: np.ndarray) -> np.ndarray:
        """Blocks `blocks` of shard `shard` [3, len(blocks), block_size], packed as `pack_documents` packs
        that shard's documents."""
        tokens, starts = self._shard(shard)
        size, n = self.block_size, len(tokens)
        block_start = (blocks * size)[:, None]
        index = block_start + np.arange(size)
        real = index < n
        input_ids = np.where(real, tokens[np.minimum(index, n - 1)], self.pad_id).astype(np.int64)
        # Each token's document start (the pad run is a document of its own, starting at n), then the block start.
        document_start = np.where(real, starts[np.searchsorted(starts, index, side="right") - 1], n)
        position_ids = index - np.maximum(document_start, block_start)
        labels = np.where(real, input_ids, IGNORE_INDEX)
        return np.stack([input_ids, position_ids, labels])

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document starts) of a shard, memory-mapped; the least recently used beyond `open_shards`
        is unmapped."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        shard_file = str(self.path / self.shards[shard]["file"])
        datasets = require_datasets()  # outside the try: a missing package is its own error
        try:
            column = datasets.Dataset.from_file(shard_file).data.table.column("input_ids")
        except Exception as error:  # pyarrow's own words: a message body cut short, a bad magic number, no file
            raise self._damaged(shard_file, str(error).splitlines()[0] if str(error) else type(error).__name__) from error
        documents = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        offsets = np.asarray(documents.offsets)
        tokens = np.asarray(documents.values)[offsets[0] : offsets[-1]]
        if len(tokens) != self.shards[shard]["tokens"]:
            raise self._damaged(shard_file, f"it holds {len(tokens)} tokens, the manifest {self.shards[shard]['tokens']}")
        self._open[shard] = (tokens, offsets[:-1] - offsets[0])
        while len(self._open) > self.open_shards:
            self._open.popitem(last=False)
        return self._open[shard]

    def _damaged(self, shard_file: str, what: str) -> UserError:
        return UserError(f"{shard_file}: not the shard that was prepared ({what}): a copy cut short, or a file "
                         f"damaged; prepare the corpus again, into a new directory or after deleting {self.path}")


class ShardOrderSampler(DistributedSampler):
    """Block indices of `PackedShards` in an order shuffled within groups of `mix` shards, one rank's share
    (module docstring)."""

    def __init__(
        self, shard_blocks: Sequence[int], seed: int = 0, num_replicas: int = 1, rank: int = 0, mix: int = 8
    ):
        self.shard_blocks = np.asarray(shard_blocks, dtype=np.int64)
        self.first_block = np.concatenate([[0], np.cumsum(self.shard_blocks)])
        self.seed, self.epoch, self.mix = seed, 0, mix
        # numpy seeds only from non-negative integers; a negative seed (which the in-memory path takes) is read
        # modulo 2^64, so every seed gives an order and each non-negative one keeps the order it always had.
        self._entropy = seed % 2**64 if seed < 0 else seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = int(self.first_block[-1]) // num_replicas
        self.skip = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self._entropy, self.epoch]).permutation(len(self.shard_blocks))
        begin = self.rank * self.num_samples + self.skip
        end = (self.rank + 1) * self.num_samples
        position = 0
        for group, start in enumerate(range(0, len(order), self.mix)):
            shards = order[start : start + self.mix]
            count = int(self.shard_blocks[shards].sum())
            if position + count > begin and position < end:
                blocks = np.concatenate([np.arange(self.first_block[s], self.first_block[s + 1]) for s in shards])
                mixed = blocks[np.random.default_rng([self._entropy, self.epoch, group]).permutation(count)]
                yield from mixed[max(begin - position, 0) : end - position].tolist()
            position += count
            if position >= end:
                return


def _batch_rows(rows: np.ndarray) -> np.ndarray:
    # The collate_fn of a BlockLoader: `PackedShards.__getitems__` already made the batch.
    return rows


class BlockLoader(DataLoader):
    """A DataLoader over `PackedShards` giving `{"input_ids", "position_ids", "labels"}` LongTensor[B, T] batches.

    A worker sends each batch as one numpy array, pickled through its pipe, and this process splits it into
    the three tensors (pinned when `pin_memory`): torch would put every tensor a worker returns into a new
    shared-memory segment, which costs more than the copy (17M against 8M tokens/s from one worker,
    block 2048, on the 2-core box).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("collate_fn", _batch_rows)
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._batches(super().__iter__())

    def _batches(self, rows: Iterator[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for batch in rows:
                tensor = torch.from_numpy(batch)
                if self.pin_memory:
                    tensor = tensor.pin_memory()
                yield dict(zip(BLOCK_FIELDS, tensor.unbind(0), strict=True))
        except UserError:
            # The pass ends here: its workers end now. Left to the garbage collector, the iterator (in a cycle with
            # the error's traceback) is finalized after its queues, and each worker then waits 5 s for a message.
            shutdown = getattr(rows, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
                if getattr(self, "_iterator", None) is rows:  # persistent workers: the next pass starts new ones
                    self._iterator = None
            raise


class StreamingLoader(ResumableDataLoader, BlockLoader):
    """A `ResumableDataLoader` over a `ShardOrderSampler` that resumes by skipping in the sampler."""

    sampler: ShardOrderSampler

    def _batches_after(self, consumed: int) -> Iterator[Any]:
        # Called when the pass starts (see ResumableDataLoader), so the skip is set before the workers draw indices.
        self.sampler.skip = consumed * self.batch_size
        return BlockLoader.__iter__(self)


def validation_loader(dataset: PackedShards, **settings: Any) -> BlockLoader:
    """The validation loader: blocks in shard order, the same ones at every evaluation."""
    return BlockLoader(dataset, **settings)


def streaming_datasets(path: str | Path, block_size: int) -> tuple[PackedShards, PackedShards]:
    """(train, validation) blocks of a prepared directory."""
    return PackedShards(path, "train", block_size), PackedShards(path, "val", block_size)


def streaming_loader(
    dataset: PackedShards, seed: int, position: LoaderPosition, num_replicas: int = 1, rank: int = 0, **settings: Any
) -> StreamingLoader:
    """The training loader: this rank's blocks in the epoch's shuffled order, resumable at `position`."""
    sampler = ShardOrderSampler(dataset.shard_blocks, seed, num_replicas, rank)
    return StreamingLoader(dataset, position=position, sampler=sampler, **settings)
