"""Streaming packed blocks from prepared shards: the packing contract, the seeded order, ranks, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from forgather.data.loader import LoaderPosition
from forgather.data.packing import TokenizedDocuments, pack_documents
from forgather.data.prepare import prepare
from forgather.data.stream import PackedShards, ShardOrderSampler, streaming_loader
from forgather.data.tokenizer import build_bpe_tokenizer
from helpers.kill import kill_when

TEXTS = [f"Entry {i}: {'alpha ' * (i % 9)}{'beta ' * (i % 4)}gamma {i * 7}." for i in range(300)]
PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tokenizer = build_bpe_tokenizer(TEXTS, vocab_size=300)
    prepare([root / "a.jsonl"], tokenizer, root / "out", val_fraction=0.1, unit_bytes=2048, num_workers=2, progress=False)
    return root / "out"


def test_each_shard_is_packed_as_pack_documents_packs_its_documents(prepared):
    from datasets import Dataset

    dataset = PackedShards(prepared, "train", block_size=24)
    offset = 0
    for shard in dataset.shards:
        documents = TokenizedDocuments.from_lists(Dataset.from_file(str(prepared / shard["file"]))["input_ids"])
        expected = pack_documents(documents, 24, dataset.pad_id)
        blocks = [dataset[offset + i] for i in range(expected["input_ids"].shape[0])]
        for field, rows in expected.items():
            assert torch.equal(torch.stack([block[field] for block in blocks]), rows), field
        offset += len(blocks)
    assert offset == len(dataset)
    last = dataset[len(dataset) - 1]
    assert (last["labels"] == -100).any() and (last["position_ids"] == 0).sum() >= 1


def test_a_padding_row_of_an_evaluation_share_is_its_block_with_every_label_ignored(prepared):
    from forgather.data.loader import padding_index

    dataset = PackedShards(prepared, "val", block_size=24)
    rows = dataset.__getitems__([1, padding_index(1), 0])
    assert (rows[:2, 0] == rows[:2, 1]).all()
    assert (rows[2, 0] != -100).any() and (rows[2, 1] == -100).all() and (rows[2, 2] != -100).any()
    with pytest.raises(IndexError):
        dataset.__getitems__([padding_index(len(dataset))])


@pytest.mark.parametrize("damage, what", [("truncate", r"\(.+\)"), ("swap", r"\(it holds \d+ tokens, the manifest \d+\)")])
def test_a_damaged_shard_is_named_with_what_to_do(prepared, tmp_path, damage, what):
    import shutil

    from forgather.errors import UserError

    copy = shutil.copytree(prepared, tmp_path / "out")
    dataset = PackedShards(copy, "train", block_size=24)
    first, second = (copy / shard["file"] for shard in dataset.shards[:2])
    if damage == "truncate":  # a copy cut short: pyarrow's message, in its words, is in the parentheses
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    else:  # another shard's file in its place
        shutil.copy(second, first)
    with pytest.raises(UserError, match=rf"^{first}: not the shard that was prepared {what}: a copy cut short, or a file damaged; "
                                        rf"prepare the corpus again, into a new directory or after deleting {copy}$"):
        dataset[0]


def test_a_missing_shard_is_named_when_the_dataset_opens_not_when_the_order_reaches_it(prepared, tmp_path):
    import shutil

    from forgather.errors import UserError

    copy = shutil.copytree(prepared, tmp_path / "out")
    shards = PackedShards(copy, "train", block_size=24).shards
    (copy / shards[-1]["file"]).unlink()
    with pytest.raises(UserError, match=rf"^{copy / shards[-1]['file']}: no such shard, though the manifest lists it "
                                        rf"\(1 of the {len(shards)} train shards are missing\): a copy that left files "
                                        rf"out; copy them too, or prepare the corpus again, into a new directory or "
                                        rf"after deleting {copy}$"):
        PackedShards(copy, "train", block_size=24)
    assert len(PackedShards(copy, "val", block_size=24)) > 0


def test_the_order_is_a_seeded_permutation_that_changes_every_epoch():
    sampler = ShardOrderSampler([5, 7, 3], seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(15)) and first == list(ShardOrderSampler([5, 7, 3], seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(15))


def test_blocks_are_mixed_within_groups_of_shards_and_groups_follow_each_other():
    sizes = [4, 6, 3, 7]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    order = list(ShardOrderSampler(sizes, seed=0, mix=2))
    assert sorted(order) == list(range(20))
    shard_of = np.searchsorted(starts, order, side="right") - 1
    # The order opens with every block of two shards (the first group), then the other two shards' blocks.
    (group,) = [{a, b} for a in range(4) for b in range(a + 1, 4) if set(shard_of[: sizes[a] + sizes[b]]) == {a, b}]
    head = shard_of[: sum(sizes[s] for s in group)]
    assert (head[1:] != head[:-1]).sum() > 1, "a group's blocks interleave its shards"
    unmixed = np.searchsorted(starts, list(ShardOrderSampler(sizes, seed=0, mix=1)), side="right") - 1
    assert (unmixed[1:] != unmixed[:-1]).sum() == 3, "mix=1: one shard after another"


def test_ranks_get_disjoint_equal_runs_of_the_same_order_and_skip_is_a_cheap_slice():
    whole = list(ShardOrderSampler([5, 7, 4], seed=1))
    ranks = [list(ShardOrderSampler([5, 7, 4], seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [5, 5, 5]
    assert sum(ranks, []) == whole[:15]
    skipping = ShardOrderSampler([5, 7, 4], seed=1, num_replicas=3, rank=1)
    skipping.skip = 3
    assert list(skipping) == ranks[1][3:]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_at_a_position_gives_the_batches_an_uninterrupted_pass_gives(prepared, workers):
    dataset = PackedShards(prepared, "train", block_size=16)
    settings = dict(batch_size=4, num_workers=workers)
    loader = streaming_loader(dataset, 5, LoaderPosition(), **settings)
    loader.sampler.set_epoch(1)
    full = [batch["input_ids"] for batch in loader]
    resumed = streaming_loader(dataset, 5, LoaderPosition(), **settings)
    resumed.load_state_dict({"epoch": 1, "batches": 7})
    resumed.sampler.set_epoch(1)
    rest = [batch["input_ids"] for batch in resumed]
    assert len(rest) == len(full) - 7
    assert all(torch.equal(a, b) for a, b in zip(rest, full[7:], strict=True))
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == len(full), "the next epoch starts at its beginning"


def test_drop_last_leaves_out_the_epochs_short_batch_and_resumes_after_full_ones(prepared):
    dataset = PackedShards(prepared, "train", block_size=16)
    blocks = len(dataset)
    batch = next(size for size in (5, 6, 7, 9, 11) if blocks % size)  # one that leaves a short batch
    kept = streaming_loader(dataset, 5, LoaderPosition(), batch_size=batch)
    dropped = streaming_loader(dataset, 5, LoaderPosition(), batch_size=batch, drop_last=True)
    sizes = [len(b["input_ids"]) for b in kept]
    assert sizes == [batch] * (blocks // batch) + [blocks % batch]
    full = [b["input_ids"] for b in dropped]
    assert [len(b) for b in full] == [batch] * (blocks // batch)
    resumed = streaming_loader(dataset, 5, LoaderPosition(), batch_size=batch, drop_last=True)
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))


def test_resident_memory_holds_only_the_open_shards(prepared):
    dataset = PackedShards(prepared, "train", block_size=16, open_shards=2)
    for index in range(len(dataset)):
        dataset[index]
    assert len(dataset._open) == 2 and len(dataset.shards) > 2


def run_streaming(outputs: Path, *overrides: str, background: bool = False):
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(outputs), "+experiment=micro",
               "data=streaming", "scheduler=constant", *overrides]
    if background:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def losses(outputs: Path) -> dict[int, float]:
    from test_run import run_dirs, train_losses

    (run_dir,) = run_dirs(outputs / "outputs")
    return train_losses(run_dir)


def test_the_stdlib_tutorial_trains_from_shards_prepared_on_first_use(tmp_path):
    # The embedded corpus, prepared by the datamodule's prepare_data into data_path, then streamed.
    done = run_streaming(tmp_path, f"data_path={tmp_path / 'shards'}", "max_steps=6")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sum(shard["documents"] for split in ("train", "val") for shard in manifest["shards"][split]) > 4000
    assert sorted(losses(tmp_path)) == list(range(6))


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_on_the_same_batches_with_two_workers(tmp_path):
    common = [f"data_path={tmp_path / 'shards'}", "+datamodule.num_workers=2"]
    done = run_streaming(tmp_path / "whole", *common, "max_steps=16")
    assert done.returncode == 0, done.stderr[-2000:]
    child = run_streaming(tmp_path / "killed", *common, "max_steps=5000", background=True)
    kill_when(child, lambda: any(tmp_path.glob("killed/outputs/micro/*/checkpoints/epoch=0-step=8.ckpt")), 180,
              "the run ended before its second checkpoint")
    from forgather.run import main
    from test_run import run_dirs

    (killed,) = run_dirs(tmp_path / "killed" / "outputs")
    assert main(["--resume", str(killed), "max_steps=16"]) == 0
    reference, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(16))
    assert all(resumed[step] == pytest.approx(reference[step], abs=1e-5) for step in range(16))


def test_the_datamodule_streams_a_prepared_corpus_and_gives_each_rank_its_share(prepared, tmp_path):
    from types import SimpleNamespace

    from forgather.data.prepare import PreparedCorpus
    from forgather.lightning.datamodule import TextDataModule

    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tokenizer = build_bpe_tokenizer(TEXTS, vocab_size=300)
    corpus = PreparedCorpus(tmp_path / "shards", [source], num_workers=1)
    module = TextDataModule(tokenizer, corpus, block_size=16, batch_size=4)
    module.prepare_data()
    module.setup("fit")
    assert isinstance(module.train_dataset, PackedShards) and len(module.val_dataset) > 0
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    shares = []
    for rank in range(2):
        module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}, strategy=cpu)
        shares.append([row.tolist() for batch in module.train_dataloader() for row in batch["input_ids"]])
    assert len(shares[0]) == len(shares[1]) == len(module.train_dataset) // 2
    assert not {tuple(row) for row in shares[0]} & {tuple(row) for row in shares[1]}


def test_fewer_blocks_than_ranks_is_an_error_naming_what_to_change(tmp_path):
    from types import SimpleNamespace

    from forgather.data.prepare import PreparedCorpus
    from forgather.errors import UserError
    from forgather.lightning.datamodule import TextDataModule

    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:40]))
    corpus = PreparedCorpus(tmp_path / "shards", [source], val_fraction=0.1, num_workers=1)
    module = TextDataModule(build_bpe_tokenizer(TEXTS, vocab_size=300), corpus, block_size=4096, batch_size=4)
    module.prepare_data()
    module.setup("fit")
    blocks = len(module.train_dataset)
    module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": blocks + 1, "rank": 0},
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(UserError, match=rf"^the training data \({blocks} blocks of block_size=4096\) gives none to each "
                                        rf"of {blocks + 1} data-parallel ranks; add data, lower block_size or train on "
                                        rf"fewer devices$"):
        module.train_dataloader()


@pytest.mark.slow
def test_two_ddp_ranks_killed_mid_epoch_resume_on_the_same_batches(tmp_path):
    common = [f"data_path={tmp_path / 'shards'}", "trainer.devices=2"]
    done = run_streaming(tmp_path / "whole", *common, "max_steps=16")
    assert done.returncode == 0, done.stderr[-2000:]
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path / "killed"),
               "+experiment=micro", "data=streaming", "scheduler=constant", *common, "max_steps=5000"]
    # Its own process group: Lightning starts rank 1 as a child, and both are killed at once.
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(child, lambda: any(tmp_path.glob("killed/outputs/micro/*/checkpoints/epoch=0-step=8.ckpt")), 240,
              "the run ended before its second checkpoint", group=True)
    from test_run import run_dirs

    (killed,) = run_dirs(tmp_path / "killed" / "outputs")
    resumed = subprocess.run([sys.executable, "-m", "forgather.run", "--resume", str(killed), "max_steps=16"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference, losses_after = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(losses_after) == list(range(16))
    assert all(losses_after[step] == pytest.approx(reference[step], abs=1e-5) for step in range(16))
