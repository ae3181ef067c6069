"""Exact mid-epoch resume on both data paths (in memory, streamed from shards): a resumed fit trains on the batches
an uninterrupted one trains on, with DataLoader workers, in a later epoch, and with another number of workers;
what breaks exactness (other shards, another number of ranks) is a warning; every rank's share of an epoch,
counted, holds each block once."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from forgather.data import cache
from forgather.data.loader import LoaderPosition
from forgather.data.prepare import PreparedCorpus, prepare
from forgather.data.stream import PackedShards, streaming_loader
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.lightning.datamodule import DataChangedWarning, TextDataModule

TEXTS = [f"Note {i}: {'red ' * (i % 5)}{'blue ' * (i % 3)}end {i * 13}." for i in range(48)]
BLOCK, BATCH = 16, 4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    return path


@pytest.fixture(scope="module")
def shards(source, tokenizer) -> Path:
    return prepare([source], tokenizer, source.parent / "shards", val_fraction=0.1, num_workers=1, progress=False,
                   unit_bytes=1024)["path"]


def make_module(kind: str, tokenizer, source: Path, shards: Path, workers: int = 0,
                unit_bytes: int = 1024) -> TextDataModule:
    documents = (PreparedCorpus(shards, [source], val_fraction=0.1, num_workers=1, unit_bytes=unit_bytes)
                 if kind == "streaming" else TEXTS)
    return TextDataModule(tokenizer, documents, block_size=BLOCK, batch_size=BATCH, val_fraction=0.1, cache=False,
                          num_workers=workers)


class Recorder(pl.LightningModule):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.head = nn.Embedding(vocab_size, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_index):
        self.seen.append(batch["input_ids"].clone())
        return self.head(batch["input_ids"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: TextDataModule, root: Path, ckpt_path=None, callbacks=(), **settings) -> Recorder:
    torch.set_num_threads(1)
    model = Recorder(len(module.tokenizer))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                         max_epochs=2, limit_val_batches=0, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(model, datamodule=module, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("kind", ["memory", "streaming"])
@pytest.mark.parametrize("into", ["the second epoch's start", "the middle of the second epoch"])
def test_a_run_resumed_in_a_later_epoch_with_workers_sees_the_batches_of_an_uninterrupted_run(
    tokenizer, source, shards, tmp_path, kind, into
):
    # Lightning calls iter() on the train loader before set_epoch when it resumes; a DataLoader with workers
    # draws indices inside iter(), so the loader must not start its pass there. Interrupted with no worker and
    # resumed with two: the number of workers changes nothing.
    whole = fit(make_module(kind, tokenizer, source, shards, workers=2), tmp_path / "whole").seen
    epoch = len(whole) // 2
    step = epoch if into == "the second epoch's start" else epoch + 2
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step)
    fit(make_module(kind, tokenizer, source, shards), tmp_path / "first", callbacks=[checkpoint], max_steps=step)
    resumed = fit(make_module(kind, tokenizer, source, shards, workers=2), tmp_path / "resumed",
                  ckpt_path=checkpoint.best_model_path).seen
    assert epoch >= 4 and len(resumed) == len(whole) - step
    assert all(torch.equal(seen, want) for seen, want in zip(resumed, whole[step:], strict=True))


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_with_workers_interrupted_and_resumed_see_every_block_of_an_epoch_once(shards, ranks):
    # Blocks of uneven shards, counted across ranks: an epoch (the second) interrupted after 3 batches and resumed
    # gives each rank the batches of an uninterrupted pass, and all ranks together every block once, but for the
    # fewer than `ranks` that do not divide among them.
    dataset = PackedShards(shards, "train", BLOCK)
    assert len({shard["tokens"] for shard in dataset.shards}) > 1
    seen: Counter[tuple[int, ...]] = Counter()
    for rank in range(ranks):
        def loader(position=None):
            made = streaming_loader(dataset, 7, position or LoaderPosition(), num_replicas=ranks, rank=rank,
                                    batch_size=BATCH, num_workers=2)
            made.sampler.set_epoch(1)
            return made

        whole = [batch["input_ids"] for batch in loader()]
        before = [batch["input_ids"] for _, batch in zip(range(3), loader())]
        resumed = loader()
        resumed.load_state_dict({"epoch": 1, "batches": 3})
        after = [batch["input_ids"] for batch in resumed]
        assert all(torch.equal(a, b) for a, b in zip(before + after, whole, strict=True))
        seen.update(tuple(row.tolist()) for batch in before + after for row in batch)
    every = Counter(tuple(dataset[index]["input_ids"].tolist()) for index in range(len(dataset)))
    assert max(seen.values()) <= max(every.values()) and not seen - every
    assert sum(every.values()) - sum(seen.values()) == len(dataset) % ranks


def resumed_warnings(saved: TextDataModule, resuming: TextDataModule) -> list[str]:
    for module in (saved, resuming):
        module.prepare_data()
        module.setup("fit")
    state = saved.state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resuming.load_state_dict(state)
    return [str(warning.message) for warning in caught if warning.category is DataChangedWarning]


def test_the_same_corpus_cut_into_other_shards_is_other_data_to_a_resumed_run(tokenizer, source, shards, tmp_path):
    # Prepared again in other units (a unit size given to prepare), the blocks and their order change: the
    # checkpoint's count of batches points at other data.
    recut = prepare([source], tokenizer, tmp_path / "recut", val_fraction=0.1, num_workers=1, progress=False,
                    unit_bytes=700)["path"]
    assert len(PackedShards(recut, "train", BLOCK).shards) != len(PackedShards(shards, "train", BLOCK).shards)
    assert resumed_warnings(make_module("streaming", tokenizer, source, shards),
                            make_module("streaming", tokenizer, source, shards)) == []
    (message,) = resumed_warnings(make_module("streaming", tokenizer, source, shards),
                                  make_module("streaming", tokenizer, source, recut, unit_bytes=700))
    assert message.startswith("resuming with other training data")


@pytest.mark.parametrize("kind", ["memory", "streaming"])
def test_resuming_on_another_number_of_ranks_is_one_warning_saying_what_to_do(tokenizer, source, shards, kind):
    # Each rank's count of batches means other blocks for another number of ranks (the share of each changes).
    saved, same, other = (make_module(kind, tokenizer, source, shards) for _ in range(3))
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    saved.trainer = same.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0},
                                                   strategy=cpu)
    other.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 4, "rank": 0}, strategy=cpu)
    assert resumed_warnings(saved, same) == []
    (message,) = resumed_warnings(saved, other)
    assert "\n" not in message
    assert message.startswith("resuming with 4 data-parallel ranks (the checkpoint's: 2): ")
    assert message.endswith("to continue exactly, resume with the checkpoint's data, batch_size and devices")
