"""TextDataModule: packed batches, seeded and cached, usable from plain Lightning code."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from transformers import PreTrainedTokenizerFast

from forgather.data import cache
from forgather.data.corpus import pydoc_topics
from forgather.data.tokenizer import train_bpe_tokenizer
from forgather.lightning.datamodule import TextDataModule
from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding

BLOCK, BATCH = 32, 4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def documents():
    return [text for _, text in pydoc_topics()][:30]


@pytest.fixture(scope="module")
def tokenizer(documents):
    return train_bpe_tokenizer(documents, vocab_size=400, cache=False)


def make_module(tokenizer, documents, **overrides):
    settings = dict(block_size=BLOCK, batch_size=BATCH, val_fraction=0.2, seed=0, max_tokens=6000)
    module = TextDataModule(tokenizer, documents, **{**settings, **overrides})
    module.prepare_data()
    module.setup("fit")
    return module


def test_batches_are_long_tensors_of_batch_by_block(tokenizer, documents):
    module = make_module(tokenizer, documents)
    for loader in (module.train_dataloader(), module.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "position_ids", "labels"}
        for tensor in batch.values():
            assert tensor.dtype == torch.long
            assert tensor.shape == (BATCH, BLOCK)


def test_max_tokens_bounds_the_packed_tokens(tokenizer, documents):
    module = make_module(tokenizer, documents, max_tokens=3000)
    real = sum(int((dataset.blocks["labels"] != -100).sum()) for dataset in (module.train_dataset, module.val_dataset))
    assert real == 3000


def test_same_seed_gives_the_same_batches(tokenizer, documents):
    first = next(iter(make_module(tokenizer, documents, cache=False).train_dataloader()))
    again = next(iter(make_module(tokenizer, documents, cache=False).train_dataloader()))
    other = next(iter(make_module(tokenizer, documents, cache=False, seed=1).train_dataloader()))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_train_order_changes_with_the_epoch(tokenizer, documents):
    loader = make_module(tokenizer, documents).train_dataloader()
    epoch0 = next(iter(loader))["input_ids"]
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["input_ids"], epoch0)


def test_validation_is_held_out_documents(tokenizer, documents):
    module = make_module(tokenizer, documents, max_tokens=None)
    train_text = tokenizer.decode(module.train_dataset.blocks["input_ids"].flatten())
    val_blocks = module.val_dataset.blocks
    val_documents = tokenizer.decode(val_blocks["input_ids"][val_blocks["labels"] != -100]).split("<|eos|>")
    held_out = [text for text in val_documents if len(text) > 200]
    assert held_out
    assert not any(text in train_text for text in held_out)
    assert len(module.train_dataset) > len(module.val_dataset)


def test_second_module_reads_packed_blocks_from_the_cache(tokenizer, documents, monkeypatch):
    first = make_module(tokenizer, documents)

    def no_build(self, documents):
        raise AssertionError("the cached blocks should have been loaded")

    monkeypatch.setattr(TextDataModule, "_build", no_build)
    second = make_module(tokenizer, documents)
    assert torch.equal(second.train_dataset.blocks["input_ids"], first.train_dataset.blocks["input_ids"])


def test_cache_key_follows_settings(tokenizer, documents, private_cache):
    make_module(tokenizer, documents)
    make_module(tokenizer, documents, block_size=BLOCK * 2)
    make_module(tokenizer, documents[:10])
    assert len(list((private_cache / "packed").glob("*.safetensors"))) == 3


def test_each_train_loader_starts_counting_consumed_batches_afresh(tokenizer, documents):
    module = make_module(tokenizer, documents)
    for _ in range(3):
        module.position.advance(epoch=0)
    assert module.train_dataloader().state_dict() == {"epoch": 0, "batches": 0}


def test_tokenizer_factory_is_called_once_on_first_use(tokenizer, documents):
    calls = []

    def factory():
        calls.append(1)
        return tokenizer

    module = TextDataModule(factory, documents, block_size=BLOCK, max_tokens=2000)
    assert calls == []
    module.prepare_data()
    module.setup("fit")
    assert module.vocab_size == 400
    assert calls == [1]


def test_default_documents_are_the_stdlib_corpus(tokenizer, monkeypatch):
    monkeypatch.setattr("forgather.data.corpus.stdlib_documents", lambda max_documents: ["from the corpus"] * 4)
    module = make_module(tokenizer, None, max_tokens=None, val_fraction=0.25)
    text = tokenizer.decode(module.train_dataset.blocks["input_ids"][0])
    assert text.startswith("from the corpus<|eos|>")


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer, documents):
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>")
    assert no_pad.pad_token_id is None
    blocks = make_module(no_pad, documents, cache=False).train_dataset.blocks
    padding = blocks["labels"] == -100
    assert padding.any()
    assert bool((blocks["input_ids"][padding] == no_pad.eos_token_id).all())


def test_loaders_before_setup_say_what_to_do(tokenizer, documents):
    with pytest.raises(RuntimeError, match="setup"):
        TextDataModule(tokenizer, documents).train_dataloader()


class TinyLM(pl.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.head = nn.Linear(16, vocab_size)
        self.seen_epochs = []
        self.seen_batches = []

    def training_step(self, batch, batch_index):
        self.seen_batches.append(batch["input_ids"].clone())
        logits = self.head(self.embed(batch["input_ids"]))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    def on_train_epoch_start(self):
        self.seen_epochs.append(self.trainer.train_dataloader.sampler.epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tokenizer, documents, tmp_path, ckpt_path=None, callbacks=(), drop_last=False, **trainer_settings):
    """Train TinyLM on a small TextDataModule; returns the model (with the batches it saw) and the trainer."""
    torch.set_num_threads(1)
    module = TextDataModule(tokenizer, documents, block_size=BLOCK, batch_size=BATCH, max_tokens=1000,
                            drop_last=drop_last)
    model = TinyLM(vocab_size=len(tokenizer))
    settings = dict(max_epochs=2, limit_val_batches=0, enable_checkpointing=bool(callbacks))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **{**settings, **trainer_settings},
    )
    trainer.fit(model, datamodule=module, ckpt_path=ckpt_path)
    return model, trainer


def test_plain_lightning_trainer_fits_on_it(tokenizer, documents, tmp_path):
    model, trainer = fit(tokenizer, documents, tmp_path, limit_train_batches=3)
    assert trainer.global_step == 6
    assert model.seen_epochs == [0, 1]


@pytest.mark.parametrize("resume_step", [3, 5, 7])  # 5 batches an epoch: mid epoch 0, its end, mid epoch 1
def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(tokenizer, documents, tmp_path, resume_step):
    uninterrupted, _ = fit(tokenizer, documents, tmp_path / "full")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_step)
    interrupted, _ = fit(tokenizer, documents, tmp_path / "first", callbacks=[checkpoint], max_steps=resume_step)
    resumed, _ = fit(tokenizer, documents, tmp_path / "resumed", ckpt_path=checkpoint.best_model_path)

    assert len(uninterrupted.seen_batches) == 10
    assert len(interrupted.seen_batches) == resume_step

    expected = uninterrupted.seen_batches[resume_step:]
    assert len(resumed.seen_batches) == len(expected)
    assert all(torch.equal(seen, want) for seen, want in zip(resumed.seen_batches, expected, strict=True))


def test_drop_last_leaves_out_each_epochs_short_training_batch_only(tokenizer, documents):
    kept = make_module(tokenizer, documents, max_tokens=1000, cache=False)
    dropped = make_module(tokenizer, documents, max_tokens=1000, cache=False, drop_last=True)
    rows = len(kept.train_dataset)
    assert rows % BATCH  # the data leaves a short batch: 19 rows in batches of 4
    assert [len(batch["input_ids"]) for batch in kept.train_dataloader()] == [BATCH] * (rows // BATCH) + [rows % BATCH]
    assert [len(batch["input_ids"]) for batch in dropped.train_dataloader()] == [BATCH] * (rows // BATCH)
    first = next(iter(dropped.train_dataloader()))
    assert torch.equal(first["input_ids"], next(iter(kept.train_dataloader()))["input_ids"])  # the same order
    assert [len(b["input_ids"]) for b in dropped.val_dataloader()] == [len(b["input_ids"]) for b in
                                                                       kept.val_dataloader()]


@pytest.mark.parametrize("resume_step", [3, 4, 6])  # 4 full batches an epoch: mid epoch 0, its end, mid epoch 1
def test_a_run_that_drops_the_short_batch_resumes_on_the_batches_of_an_uninterrupted_one(tokenizer, documents,
                                                                                         tmp_path, resume_step):
    uninterrupted, _ = fit(tokenizer, documents, tmp_path / "full", drop_last=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_step)
    fit(tokenizer, documents, tmp_path / "first", callbacks=[checkpoint], max_steps=resume_step, drop_last=True)
    resumed, _ = fit(tokenizer, documents, tmp_path / "resumed", ckpt_path=checkpoint.best_model_path, drop_last=True)
    assert len(uninterrupted.seen_batches) == 8 and all(len(b) == BATCH for b in uninterrupted.seen_batches)
    expected = uninterrupted.seen_batches[resume_step:]
    assert len(resumed.seen_batches) == len(expected)
    assert all(torch.equal(seen, want) for seen, want in zip(resumed.seen_batches, expected, strict=True))


DDP_SCRIPT = """
import json, sys
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from forgather.data.corpus import pydoc_topics
from forgather.data.tokenizer import train_bpe_tokenizer
from forgather.lightning.datamodule import TextDataModule
from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding

mode, out = sys.argv[1], sys.argv[2]


class Recorder(pl.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.head = torch.nn.Embedding(vocab_size, 1)
        self.seen = []

    def training_step(self, batch, batch_index):
        self.seen.append(batch["input_ids"][:, 0].tolist())
        return self.head(batch["input_ids"]).mean()

    def on_train_end(self):
        with open(f"{out}/{mode}-{self.global_rank}.json", "w") as file:
            json.dump(self.seen, file)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


documents = [text for _, text in pydoc_topics()][:30]
tokenizer = train_bpe_tokenizer(documents, vocab_size=400)
module = TextDataModule(tokenizer, documents, block_size=32, batch_size=2, max_tokens=1000)
checkpoints = [ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=3)] if mode == "first" else []
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, max_steps=3 if mode == "first" else -1,
    limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=bool(checkpoints), callbacks=checkpoints, default_root_dir=out,
)
trainer.fit(Recorder(len(tokenizer)), datamodule=module,
            ckpt_path=f"{out}/ckpt/epoch=0-step=3.ckpt" if mode == "resumed" else None)
# Tear gloo down before interpreter exit; its threads otherwise abort the process now and then.
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ranks_get_different_shards_and_each_resumes_exactly(tmp_path, private_cache):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, cache.CACHE_ENV: str(private_cache), "OMP_NUM_THREADS": "1"}
    for mode in ("full", "first", "resumed"):
        subprocess.run([sys.executable, str(script), mode, str(tmp_path)], env=env, check=True, timeout=300)

    seen = {
        (mode, rank): json.loads((tmp_path / f"{mode}-{rank}.json").read_text())
        for mode in ("full", "resumed")
        for rank in (0, 1)
    }
    assert seen["full", 0] != seen["full", 1]
    for rank in (0, 1):
        assert seen["resumed", rank] == seen["full", rank][3:]


def test_ddp_ranks_validate_each_block_once_and_report_one_processs_val_loss(tmp_path):
    """139 validation blocks over two ranks: Lightning's DistributedSampler gave rank 1 block 0 again, counted
    twice in val/loss; the even share pads with a block whose labels are ignored."""
    from helpers.ranks import start, start_ranks, wait_all

    script = [str(Path(__file__).parent / "helpers" / "ddp_validate.py"), str(tmp_path)]
    wait_all([start(script), *start_ranks([*script, "--devices", "2"], 2)])
    one, two = (json.loads((tmp_path / f"val-{devices}.json").read_text()) for devices in (1, 2))
    assert one["blocks"] % 2 == 1
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)


def test_an_even_share_gives_every_rank_as_many_rows_and_each_row_once():
    from forgather.data.loader import EvenShareSampler, padding_index

    shares = [list(EvenShareSampler(10, num_replicas=4, rank=rank)) for rank in range(4)]
    assert [len(share) for share in shares] == [3] * 4
    real = sorted(i for share in shares for i in share if i >= 0)
    assert real == list(range(10))
    assert [i for share in shares for i in share if i < 0] == [padding_index(0), padding_index(1)]


def test_a_padding_row_is_its_row_with_every_label_ignored(tokenizer, documents):
    from forgather.data.loader import padding_index

    dataset = make_module(tokenizer, documents, cache=False).val_dataset
    row, padding = dataset[2], dataset[padding_index(2)]
    assert torch.equal(padding["input_ids"], row["input_ids"]) and torch.equal(padding["position_ids"], row["position_ids"])
    assert (row["labels"] != -100).any() and (padding["labels"] == -100).all()


@pytest.mark.parametrize("attention_fn", ["sdpa", "eager", "flex"])
def test_packed_rows_give_each_document_the_logits_it_gets_alone(tokenizer, documents, attention_fn):
    """The contract with forgather.models: position ids from packing make the model mask across documents."""
    torch.manual_seed(0)
    layer = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=2, attention_fn=attention_fn),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=32),
        norm_factory=RMSNorm,
    )
    model = CausalLM(len(tokenizer), 16, 2, layer, RMSNorm, rope=RotaryEmbedding(8, theta=10000.0)).eval()
    short_documents = [text[:60] for text in documents]
    blocks = make_module(tokenizer, short_documents, max_tokens=None, cache=False).train_dataset.blocks
    input_ids, position_ids = blocks["input_ids"][:4], blocks["position_ids"][:4]

    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids)
        starts = [tuple(start) for start in torch.nonzero(position_ids == 0).tolist()]
        ends = [*starts[1:], (len(input_ids), 0)]
        checked = 0
        for (row, start), (end_row, end) in zip(starts, ends, strict=True):
            stop = end if end_row == row else BLOCK
            alone = model(input_ids[row : row + 1, start:stop])
            torch.testing.assert_close(packed[row, start:stop], alone[0], atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked > len(input_ids)


def test_loaders_pin_batches_when_the_trainer_runs_on_cuda(tokenizer, documents):
    # A batch copied from pinned memory does not make the host wait for the GPU (Lightning copies non-blocking).
    from types import SimpleNamespace

    module = make_module(tokenizer, documents)
    for device, pinned in (("cpu", False), ("cuda", True)):
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert module.train_dataloader().pin_memory is pinned
        assert module.val_dataloader().pin_memory is pinned


def test_drop_last_with_fewer_rows_than_a_batch_is_an_error_not_a_fit_that_ends_at_once(tokenizer, documents):
    # Lightning only warns of a loader without batches and reports the fit finished, with no step trained.
    from forgather.errors import UserError

    module = make_module(tokenizer, documents, max_tokens=1000, cache=False, drop_last=True, batch_size=64)
    rows = len(module.train_dataset)
    with pytest.raises(UserError, match=rf"^the training data gives no full batch: {rows} blocks of block_size={BLOCK} "
                                        r"in all, fewer than batch_size=64, and drop_last=true leaves the short batch "
                                        r"out; lower batch_size, set drop_last=false or add data$"):
        module.train_dataloader()
    module.drop_last = False
    assert len(module.train_dataloader()) == 1


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_share_an_epoch_without_a_block_seen_twice(tokenizer, documents, ranks):
    # Lightning's own DistributedSampler wrapper fills every rank's share with repeated blocks; the module's leaves
    # out the fewer than `ranks` that do not divide, and each rank's order is otherwise the one Lightning gives.
    from types import SimpleNamespace

    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    from forgather.data.loader import EpochShuffleSampler

    module = make_module(tokenizer, documents, max_tokens=1000, cache=False)
    blocks = len(module.train_dataset)
    assert blocks % ranks
    seen = []
    for rank in range(ranks):
        module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": ranks, "rank": rank},
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))
        loader = module.train_dataloader()
        loader.sampler.set_epoch(1)
        order = list(loader.sampler)
        padded = DistributedSamplerWrapper(EpochShuffleSampler(blocks, seed=0), num_replicas=ranks, rank=rank,
                                           shuffle=False)
        padded.set_epoch(1)
        assert order == list(padded)[: blocks // ranks]
        seen += [tuple(row.tolist()) for batch in loader for row in batch["input_ids"]]
    every = [tuple(row.tolist()) for row in module.train_dataset.blocks["input_ids"]]
    assert len(seen) == len(set(seen)) == blocks - blocks % ranks and set(seen) <= set(every)
