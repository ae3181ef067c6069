"""An adversarial audit of the streaming path (forgather.data.stream, its use in TextDataModule): exact resume at
every position (epoch boundaries, the short last batch, gradient accumulation, workers, ranks), ranks' shares,
and the mistakes a user makes with prepared shards, each one line saying what to do."""

from __future__ import annotations

import gc
import json
import shutil
import time
import warnings
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
from forgather.data.stream import PackedShards, ShardOrderSampler, streaming_loader
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.errors import UserError, describe
from forgather.lightning.datamodule import TextDataModule

TEXTS = [f"Item {i}: {'one ' * (i % 7)}{'two ' * (i % 3)}stop {i * 11}." for i in range(90)]
BLOCK, BATCH = 16, 4
CPU = SimpleNamespace(root_device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "items.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    return path


@pytest.fixture(scope="module")
def shards(source, tokenizer) -> Path:
    return prepare([source], tokenizer, source.parent / "shards", val_fraction=0.1, num_workers=1, progress=False,
                   unit_bytes=1024)["path"]


def rows(loader) -> list[torch.Tensor]:
    return [batch["input_ids"] for batch in loader]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---- 1. exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_a_pass_resumed_after_any_number_of_batches_gives_the_rest_of_the_uninterrupted_pass(shards, ranks, drop_last):
    # Every resume point of the epoch, 0 to all its batches (the short last one included), on every rank.
    dataset = PackedShards(shards, "train", BLOCK)
    counts = []
    for rank in range(ranks):
        def loader(position=None):
            made = streaming_loader(dataset, 3, position or LoaderPosition(), num_replicas=ranks, rank=rank,
                                    batch_size=BATCH, drop_last=drop_last)
            made.sampler.set_epoch(1)
            return made

        whole = rows(loader())
        counts.append(len(whole))
        assert len(whole) == len(loader())
        for consumed in range(len(whole) + 1):
            resumed = loader()
            resumed.load_state_dict({"epoch": 1, "batches": consumed})
            assert same(rows(resumed), whole[consumed:]), consumed
    assert len(set(counts)) == 1, "every rank runs as many batches (a collective waits for the others)"


@pytest.mark.parametrize("workers", [1, 2])
def test_ranks_with_workers_resumed_at_the_edges_of_an_epoch_give_the_uninterrupted_batches(shards, workers):
    # Resumed before the first batch, after one, before and after the short last one; then the next epoch whole.
    # One loader a rank, its workers kept between passes (persistent_workers, as TextDataModule sets).
    dataset = PackedShards(shards, "train", BLOCK)
    reference = {rank: [] for rank in range(2)}
    for rank in range(2):
        loader = streaming_loader(dataset, 9, LoaderPosition(), num_replicas=2, rank=rank, batch_size=BATCH,
                                  num_workers=workers, persistent_workers=True)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            reference[rank].append(rows(loader))
        whole, following = reference[rank]
        assert len(whole[-1]) < BATCH and not same(whole, following)
        for consumed in (0, 1, len(whole) - 1, len(whole)):
            loader.sampler.set_epoch(0)
            loader.load_state_dict({"epoch": 0, "batches": consumed})
            assert same(rows(loader), whole[consumed:]), consumed
            loader.sampler.set_epoch(1)
            assert same(rows(loader), following), "the next epoch starts at its beginning"
        del loader  # its workers end here, not in a later test
        gc.collect()
    assert len(reference[0][0]) == len(reference[1][0])


def test_a_sampler_with_a_negative_seed_orders_blocks_as_the_in_memory_path_allows(shards):
    # The in-memory path takes any integer seed (EpochShuffleSampler reduces it mod 2^32); streaming must too, not
    # stop with numpy's "expected non-negative integer", which names no setting.
    order = list(ShardOrderSampler([5, 7, 3], seed=-1))
    assert sorted(order) == list(range(15)) and order == list(ShardOrderSampler([5, 7, 3], seed=-1))


class Recorder(pl.LightningModule):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.head = nn.Embedding(vocab_size, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_index):
        self.seen.append(batch["input_ids"].clone())
        return self.head(batch["input_ids"]).mean()

    def validation_step(self, batch, batch_index):
        self.log("val/loss", self.head(batch["input_ids"]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_module(tokenizer, source, shards, batch_size=BATCH, **settings) -> TextDataModule:
    corpus = PreparedCorpus(shards, [source], val_fraction=0.1, num_workers=1, unit_bytes=1024)
    return TextDataModule(tokenizer, corpus, block_size=BLOCK, batch_size=batch_size, **settings)


def fit(module, root: Path, ckpt_path=None, callbacks=(), **settings) -> Recorder:
    torch.set_num_threads(1)
    model = Recorder(len(module.tokenizer))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                         **{"max_epochs": 2, "limit_val_batches": 0, **settings})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=module, ckpt_path=ckpt_path)
    del trainer
    gc.collect()  # the loaders' workers end with this test
    return model


@pytest.mark.parametrize("batch_size", [4, 8])
def test_a_fit_with_gradient_accumulation_resumed_mid_epoch_sees_the_batches_of_an_uninterrupted_one(
    tokenizer, source, shards, tmp_path, batch_size
):
    # Two batches a step (an epoch of an odd number of batches ends on a step of one); the checkpoint is written
    # after an optimizer step, in the second epoch.
    whole = fit(make_module(tokenizer, source, shards, batch_size, num_workers=1), tmp_path / "whole",
                accumulate_grad_batches=2).seen
    epoch = len(whole) // 2
    steps_in_first_epoch = -(-epoch // 2)
    step = steps_in_first_epoch + 2
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step)
    fit(make_module(tokenizer, source, shards, batch_size), tmp_path / "first", callbacks=[checkpoint],
        max_steps=step, accumulate_grad_batches=2)
    resumed = fit(make_module(tokenizer, source, shards, batch_size, num_workers=1), tmp_path / "resumed",
                  ckpt_path=checkpoint.best_model_path, accumulate_grad_batches=2).seen
    consumed = epoch + 4
    assert epoch >= 6 and epoch % 2 == batch_size // 8  # batch 8: an epoch of 9 batches, its last step one batch
    assert same(resumed, whole[consumed:]), (len(whole), len(resumed), consumed)


def test_a_fit_resumed_from_a_checkpoint_written_by_a_mid_epoch_validation_sees_the_uninterrupted_batches(
    tokenizer, source, shards, tmp_path
):
    # The checkpoint a validation writes (val_check_interval inside the epoch), not a step checkpoint.
    settings = dict(val_check_interval=5, limit_val_batches=1, num_sanity_val_steps=0)
    whole = fit(make_module(tokenizer, source, shards), tmp_path / "whole", **settings).seen
    epoch = len(whole) // 2
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=False)
    fit(make_module(tokenizer, source, shards), tmp_path / "first", callbacks=[checkpoint], max_steps=epoch + 12,
        **settings)
    saved = tmp_path / "ckpt" / f"epoch=1-step={epoch + 10}.ckpt"
    assert saved.is_file(), sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    resumed = fit(make_module(tokenizer, source, shards, num_workers=1), tmp_path / "resumed", ckpt_path=saved,
                  **settings).seen
    assert same(resumed, whole[epoch + 10:]), (len(whole), len(resumed))


def test_a_fit_resumed_from_an_epoch_end_checkpoint_starts_the_next_epoch_at_its_first_batch(
    tokenizer, source, shards, tmp_path
):
    whole = fit(make_module(tokenizer, source, shards), tmp_path / "whole").seen
    epoch = len(whole) // 2
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
    fit(make_module(tokenizer, source, shards), tmp_path / "first", callbacks=[checkpoint], max_epochs=1)
    saved = tmp_path / "ckpt" / f"epoch=0-step={epoch}.ckpt"
    assert saved.is_file(), sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    resumed = fit(make_module(tokenizer, source, shards, num_workers=2), tmp_path / "resumed", ckpt_path=saved).seen
    assert same(resumed, whole[epoch:]), (len(whole), len(resumed))


# ---- 2. ranks ----------------------------------------------------------------------------------------------


def test_ranks_of_the_datamodule_share_an_epoch_and_get_equal_batches_even_below_one_batch_each(
    tokenizer, source, shards
):
    module = make_module(tokenizer, source, shards, batch_size=64)
    module.prepare_data()
    module.setup("fit")
    blocks = len(module.train_dataset)
    assert blocks // 2 < 64
    shares = []
    for rank in range(2):
        module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}, strategy=CPU)
        shares.append(rows(module.train_dataloader()))
    assert [len(share) for share in shares] == [1, 1] and len(shares[0][0]) == len(shares[1][0]) == blocks // 2
    seen = [tuple(row.tolist()) for share in shares for batch in share for row in batch]
    every = sorted(tuple(module.train_dataset[i]["input_ids"].tolist()) for i in range(blocks))
    assert len(seen) == blocks - blocks % 2 and set(seen) <= set(every)
    module.drop_last = True  # then no rank has a batch to train on: an error, not a fit that ends at once
    with pytest.raises(UserError, match=rf"^the training data gives no full batch: {blocks // 2} blocks of "
                                        rf"block_size={BLOCK} a rank, fewer than batch_size=64, and drop_last=true "
                                        rf"leaves the short batch out; lower batch_size, set drop_last=false or add "
                                        rf"data$"):
        module.train_dataloader()


# ---- 3. mistakes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, persistent", [(0, False), (1, False), (2, True)])
def test_a_damaged_shard_read_by_a_dataloader_worker_is_one_line_naming_it(shards, tmp_path, workers, persistent):
    # Read in a worker process, torch re-raises the error as "Caught UserError in DataLoader worker process 0."
    # followed by the worker's whole traceback: the CLI then printed that first line and the traceback below it.
    # And the workers end with the pass: left to the garbage collector they held the process 5 s.
    copy = shutil.copytree(shards, tmp_path / "shards")
    dataset = PackedShards(copy, "train", BLOCK)
    for shard in dataset.shards:
        path = copy / shard["file"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    loader = streaming_loader(dataset, 0, LoaderPosition(), batch_size=BATCH, num_workers=workers,
                              persistent_workers=persistent)
    for _ in range(2):  # a second pass (persistent workers: new ones) says the same
        with pytest.raises(UserError) as raised:
            rows(loader)
        line = describe(raised.value)
        assert "\n" not in line and not line.startswith("Caught")
        assert line.startswith(f"{copy}/train/") and " not the shard that was prepared (" in line
        assert line.endswith(f"prepare the corpus again, into a new directory or after deleting {copy}")
    del raised, loader
    started = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("kept", [0, 0.5, -1])
def test_a_shard_cut_short_is_an_error_when_the_dataset_opens_not_when_the_order_reaches_it(shards, tmp_path, kept):
    # Found only when read, a copy cut short stopped a run hours in, and under data parallelism on the one rank
    # whose run of the order holds it (the others blocked in a collective until its end reached them). Every shard
    # ends with Arrow's end-of-stream marker, so a cut is seen when the run starts, for 8 bytes read a shard.
    copy = shutil.copytree(shards, tmp_path / "shards")
    last = copy / PackedShards(copy, "val", BLOCK).shards[-1]["file"]
    size = last.stat().st_size
    last.write_bytes(last.read_bytes()[: int(size * kept) if kept >= 0 else size - 1])
    assert len(PackedShards(copy, "train", BLOCK)) > 0
    with pytest.raises(UserError, match=rf"^{last}: not the shard that was prepared \(it ends before the end-of-stream "
                                        rf"marker its writer puts last: cut short\): a copy cut short, or a file "
                                        rf"damaged; prepare the corpus again, into a new directory or after deleting "
                                        rf"{copy}$"):
        PackedShards(copy, "val", BLOCK)
