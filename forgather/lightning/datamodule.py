"""TextDataModule: documents -> tokenizer -> packed blocks -> train/validation DataLoaders, for Lightning.

The pipeline (each stage in `forgather.data`): read the documents (the first `max_documents`), tokenize them
with eos appended (stopping at `max_tokens` tokens), split by document into train/validation with `seed`,
and pack each side into blocks of `block_size` tokens. Batches are
`{"input_ids", "position_ids", "labels"}`, LongTensor[B, block_size] each (see `forgather.data.packing`).

The packed tensors are cached in one safetensors file under `<cache>/packed/`, keyed by a hash of the documents'
text, the tokenizer's serialized form and every setting above, and written atomically: `prepare_data`
(one process per node) builds them, `setup` (every process) loads them. With `cache=False`, `setup` builds
them in memory. Works in plain Lightning code.

Resumable: training order comes from `EpochShuffleSampler` (seed, epoch) and nothing touches global RNGs. Under
data parallelism rank r of R takes positions r, r + R, ... of that order (Lightning's `DistributedSamplerWrapper`,
given by this module so that the fewer than R blocks that do not divide among the ranks are left out of the
epoch: Lightning's own wrapper repeats blocks to fill every rank's share).
The module counts the training batches consumed in the current epoch (`on_before_batch_transfer`) into the
train loader's `LoaderPosition`; Lightning stores the loader's state in checkpoints and restores it, and the
loader then skips those batches, so a run resumed mid-epoch sees exactly the batches an uninterrupted run
would (see `forgather.data.loader`). When the Trainer runs on a CUDA device the loaders pin their batches, so
Lightning's copy to the device is asynchronous (a copy from pageable memory first waits for the GPU to finish
the work queued before it: a host sync every step). If the LightningModule overrides `on_before_batch_transfer` too,
Lightning calls only this module's hook (and warns).

A checkpoint records which data the run trained on (`state_dict`: a fingerprint of the documents, tokenizer
and every setting that shapes the blocks and their order, the batch size and the number of data-parallel
ranks): resuming it with other data (a corpus file edited since, another tokenizer, shards cut otherwise),
another batch size or another number of ranks is a warning that says the resumed steps are not those of an
uninterrupted run, as the loader's position, a count of one rank's batches, then points elsewhere. The number
of DataLoader workers changes nothing: batches are drawn in this process's order either way.

Streaming (`data=streaming`, docs/data.md): when `documents` is a `forgather.data.prepare.PreparedCorpus`,
`prepare_data` prepares its shards if its directory is missing (and checks that an existing one was prepared
from the same sources, tokenizer and settings), and the datasets are `forgather.data.stream.PackedShards`:
blocks read from memory-mapped shards, trained in `ShardOrderSampler` order (each data-parallel rank its own
run of shards, from the strategy's `distributed_sampler_kwargs`), resumed through the same `LoaderPosition`
count. `val_fraction`, `max_documents`, `max_tokens` and `cache` then do not apply: the corpus's own settings
split and key the shards.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from forgather.data.cache import atomic_write, cache_dir, documents_fingerprint, fingerprint
from forgather.data.loader import EpochShuffleSampler, EvenShareSampler, LoaderPosition, ResumableDataLoader
from forgather.data.packing import PackedDataset, load_datasets, pack_documents, save_datasets, tokenize_documents
from forgather.data.prepare import PreparedCorpus
from forgather.data.sources import Documents, lone_surrogate, preview, resolve_documents
from forgather.data.split import split_documents
from forgather.data.tokenizer import tokenizer_fingerprint
from forgather.errors import UserError

# Bump when packing or splitting changes, so stale cached blocks are not reused.
PACKED_FORMAT = 1


class DataChangedWarning(UserWarning):
    """A run resumed with other data or batch size than its checkpoint's."""


class NoValidationWarning(UserWarning):
    """The data holds no validation blocks: the run reports no val/loss."""


class TextDataModule(pl.LightningDataModule):
    """Packed causal-LM batches from a documents source.

    Args:
        tokenizer: a tokenizer (anything with `eos_token_id`, HF-style `__call__`, and `pad_token_id`, which
            may be None: padding then reuses the eos id, harmless since padding is never a label) or a
            zero-argument factory returning one (called once, on first use).
        documents: an iterable of texts or a zero-argument callable returning one; default: the embedded
            stdlib corpus (`forgather.data.corpus.stdlib_documents`).
        block_size: tokens per packed row.
        batch_size: rows per batch.
        val_fraction: share of documents held out for validation.
        num_workers: DataLoader worker processes.
        seed: seeds the split and the per-epoch shuffling.
        max_documents / max_tokens: keep only the first documents / tokens (small CPU runs).
        cache: keep packed tensors on disk between runs.
        drop_last: leave out each epoch's last training batch when it has fewer than `batch_size` rows.
            Compiled runs want it: the short batch changes the inputs' shape, and torch.compile then compiles
            the model again (dynamic in the batch size, the graph it keeps using). Off by default, so runs keep
            every row; validation always keeps them.
    """

    def __init__(
        self,
        tokenizer: Any | Callable[[], Any],
        documents: Documents | None = None,
        block_size: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        max_documents: int | None = None,
        max_tokens: int | None = None,
        cache: bool = True,
        drop_last: bool = False,
    ):
        super().__init__()
        _check_settings(block_size=block_size, batch_size=batch_size, num_workers=num_workers,
                        max_documents=max_documents, max_tokens=max_tokens, val_fraction=val_fraction)
        self.save_hyperparameters(ignore=["tokenizer", "documents"])
        self._tokenizer = tokenizer
        self.documents = documents
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.max_documents = max_documents
        self.max_tokens = max_tokens
        self.cache = cache
        self.drop_last = drop_last
        self.train_dataset: PackedDataset | None = None
        self.val_dataset: PackedDataset | None = None
        # Shared with the current train loader (and any copy Lightning rebuilds from its arguments under DDP).
        self.position = LoaderPosition()
        self.data_key: str | None = None  # what setup() loaded, recorded in checkpoints (state_dict)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, built from its factory on first access."""
        if not hasattr(self._tokenizer, "eos_token_id"):
            self._tokenizer = self._tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def prepare_data(self) -> None:
        if isinstance(self.documents, PreparedCorpus):
            self.documents.prepare(self.tokenizer)
        elif self.cache:
            documents = self._documents()
            self._cached_path(documents, self._key(documents))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if isinstance(self.documents, PreparedCorpus):
            from forgather.data.stream import streaming_datasets

            path = self.documents.prepare(self.tokenizer)  # no work when prepare_data made it; checks the key
            self.train_dataset, self.val_dataset = streaming_datasets(path, self.block_size)
            # The shards as cut, not only the corpus's key: blocks never span shards, so the same corpus prepared
            # again in other units (another unit size) gives other blocks and order.
            layout = [(shard["file"], shard["tokens"]) for shard in self.train_dataset.shards]
            self.data_key = fingerprint(self.documents.key, layout, self.block_size, self.seed)
        else:
            documents = self._documents()
            self.data_key = self._key(documents)
            if self.cache:
                datasets = load_datasets(self._cached_path(documents, self.data_key))
                self.train_dataset, self.val_dataset = datasets["train"], datasets["val"]
            else:
                self.train_dataset, self.val_dataset = self._build(documents)
        self._check_blocks()

    def _check_blocks(self) -> None:
        # Lightning ends a fit without training batches as if it had finished, and skips an empty validation
        # without a word: both would pass for a run that worked.
        if len(self.train_dataset) == 0:
            self.train_dataset = self.val_dataset = None  # a corrected source is read again by the next setup()
            raise UserError("the data has no training documents (an empty file or directory, texts that are all "
                            "blank, or max_documents=0 or max_tokens=0); check the data source (data_path, data_paths)")
        if len(self.val_dataset) == 0:
            rank_zero_warn("the data has no validation blocks (val_fraction=0, or too few documents to hold one "
                           "out): the run reports no val/loss; raise val_fraction or add documents",
                           category=NoValidationWarning)

    def state_dict(self) -> dict[str, Any]:
        if not self.data_key:
            return {}
        return {"data": self.data_key, "batch_size": self.batch_size, "ranks": self._share().get("num_replicas", 1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Say so when a run resumes with other data or batches than its checkpoint was trained on."""
        changed = []
        if state_dict.get("data") not in (None, self.data_key):
            changed.append("other training data (its documents, tokenizer or packing settings changed since)")
        if state_dict.get("batch_size") not in (None, self.batch_size):
            changed.append(f"batch_size={self.batch_size} (the checkpoint's: {state_dict['batch_size']})")
        ranks = self._share().get("num_replicas", 1)
        if state_dict.get("ranks") not in (None, ranks):
            changed.append(f"{ranks} data-parallel ranks (the checkpoint's: {state_dict['ranks']})")
        if changed:
            rank_zero_warn(f"resuming with {' and '.join(changed)}: training goes on at the checkpoint's count of "
                           f"batches into the epoch, so its batches are not those an uninterrupted run would "
                           f"have trained on (some skipped, some seen twice until the epoch ends); to continue "
                           f"exactly, resume with the checkpoint's data, batch_size and devices",
                           category=DataChangedWarning)

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset)
        # A fresh count per loader: a restored checkpoint fills it in through the loader's load_state_dict.
        self.position = LoaderPosition()
        share = self._share()
        if isinstance(self.documents, PreparedCorpus):
            from forgather.data.stream import streaming_loader

            loader = streaming_loader(dataset, self.seed, self.position, **share, **self._loader_settings(),
                                      drop_last=self.drop_last)
        else:
            sampler = EpochShuffleSampler(len(dataset), self.seed)
            if share:
                # Lightning's own wrapper, but leaving out the fewer than R blocks that do not divide among the R
                # ranks (as streaming does) where Lightning's pads every share with blocks seen twice in the epoch.
                sampler = DistributedSamplerWrapper(sampler, **share, shuffle=False, drop_last=True)
            loader = ResumableDataLoader(dataset, position=self.position, sampler=sampler, drop_last=self.drop_last,
                                         **self._loader_settings())
        self._check_batches(len(dataset), len(loader.sampler), share.get("num_replicas", 1))
        return loader

    def _check_batches(self, blocks: int, rows: int, ranks: int) -> None:
        # A fit whose loader gives no batch ends at once as finished (Lightning only warns), like one without data.
        # `rows`: a rank's share of the `blocks`.
        if rows == 0:
            raise UserError(f"the training data ({blocks} blocks of block_size={self.block_size}) gives none to each "
                            f"of {ranks} data-parallel ranks; add data, lower block_size or train on fewer devices")
        if self.drop_last and rows < self.batch_size:
            raise UserError(f"the training data gives no full batch: {rows} blocks of block_size={self.block_size} "
                            f"{'a rank' if ranks > 1 else 'in all'}, fewer than batch_size={self.batch_size}, and "
                            f"drop_last=true leaves the short batch out; lower batch_size, set drop_last=false or "
                            f"add data")

    def val_dataloader(self) -> DataLoader:
        dataset = self._require(self.val_dataset)
        share = self._share()
        # Each rank's share padded with rows whose labels are ignored, so val/loss is one process's (loader.py)
        sampler = EvenShareSampler(len(dataset), **share) if share.get("num_replicas", 1) > 1 else None
        if isinstance(self.documents, PreparedCorpus):
            from forgather.data.stream import validation_loader

            return validation_loader(dataset, sampler=sampler, **self._loader_settings())
        return DataLoader(dataset, sampler=sampler, **self._loader_settings())

    def _share(self) -> dict[str, int]:
        """The strategy's data-parallel share, {"num_replicas", "rank"} ({} on one device; under pipeline
        parallelism the stages of a replica read alike)."""
        return (getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer else None) or {}

    def _loader_settings(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self._on_cuda(),
        }

    def _on_cuda(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    @staticmethod
    def _require(dataset: PackedDataset | None) -> PackedDataset:
        if dataset is None:
            raise RuntimeError("TextDataModule: call setup() (or let the Trainer do it) before asking for loaders")
        return dataset

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.position.advance(self.trainer.current_epoch)
        return batch

    def _documents(self) -> list[str]:
        if self.documents is None:
            from forgather.data.corpus import stdlib_documents

            return stdlib_documents(self.max_documents)
        texts = resolve_documents(self.documents)
        if isinstance(texts, (str, bytes, Path)):  # else each character would be a document of its own
            raise ValueError(f"documents: one {type(texts).__name__} ({preview(texts)}), not a list of texts; give "
                             f"a list of documents, or read files with data=text_files data_paths=... or data=jsonl "
                             f"data_path=...")
        documents = list(itertools.islice(texts, self.max_documents))
        for index, text in enumerate(documents):
            if not isinstance(text, str):
                raise ValueError(f"documents: document {index} is {type(text).__name__} {preview(text)}, not text; "
                                 f"give a list of strings (leave out or convert what is not text)")
            if (surrogate := lone_surrogate(text)) is not None:
                raise ValueError(f"documents: document {index} holds {surrogate}, which is no text (UTF-8 and the "
                                 f"tokenizer refuse it); fix or leave out that document")
        return documents

    def _key(self, documents: list[str]) -> str:
        """What the packed blocks and their order depend on."""
        return fingerprint(
            PACKED_FORMAT,
            documents_fingerprint(documents),
            tokenizer_fingerprint(self.tokenizer),
            self.block_size,
            self.val_fraction,
            self.seed,
            self.max_tokens,
        )

    def _cached_path(self, documents: list[str], key: str) -> Path:
        """The cache file holding train and val blocks for these documents (of `_key` key), built if missing."""
        path = cache_dir("packed") / f"{key}.safetensors"
        if not path.is_file():
            train, val = self._build(documents)
            atomic_write(path, lambda tmp: save_datasets(tmp, {"train": train, "val": val}))
        return path

    def _build(self, documents: list[str]) -> tuple[PackedDataset, PackedDataset]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        tokenized = tokenize_documents(documents, self.tokenizer, self.max_tokens)
        train, val = split_documents(range(len(tokenized)), self.val_fraction, self.seed)
        train_blocks, val_blocks = (
            pack_documents(tokenized.select(part), self.block_size, pad_id) for part in (train, val)
        )
        return PackedDataset(train_blocks), PackedDataset(val_blocks)


# The command-line spelling of each setting that a user may get wrong (conf/base/causal_lm.yaml).
_SETTING_SPELLING = {
    "block_size": "block_size=", "batch_size": "batch_size=", "val_fraction": "val_fraction=",
    "num_workers": "+datamodule.num_workers=", "max_documents": "+datamodule.max_documents=",
    "max_tokens": "+datamodule.max_tokens=",
}


def _check_settings(**settings: Any) -> None:
    """One line naming a setting that cannot work, before any document is read or tokenized."""
    def whole(value: Any) -> bool:  # numpy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    for name, value in settings.items():
        if name in ("block_size", "batch_size"):
            problem = None if whole(value) and value >= 1 else "must be a whole number of 1 or more"
        elif name == "num_workers":
            problem = None if whole(value) and value >= 0 else "must be a whole number of 0 (no workers) or more"
        elif name in ("max_documents", "max_tokens"):
            valid = value is None or whole(value) and value >= 0
            problem = None if valid else "must be a whole number of 0 or more, or none (all)"
        else:  # val_fraction
            fraction = isinstance(value, numbers.Real) and not isinstance(value, bool)
            problem = None if fraction and 0 <= value < 1 else "must be a fraction in [0, 1)"
        if problem:
            raise ValueError(f"{name}={value!r}: {problem}; set it ({_SETTING_SPELLING[name]} on the command line)")
