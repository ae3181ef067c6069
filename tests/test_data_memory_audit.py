"""Audit of the in-memory data path (sources -> split -> tokenizer -> packing -> resumable loader, TextDataModule):
a run resumed at any batch reads the uninterrupted run's batches (workers, ranks, the short batch, the epoch's end);
packing keeps documents apart; a user's mistake in the settings or the documents is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forgather.data import cache
from forgather.data.packing import IGNORE_INDEX, TokenizedDocuments, pack_documents, tokenize_documents
from forgather.data.sources import jsonl_documents, text_documents
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.lightning.datamodule import TextDataModule
from test_data_mistakes import reported

TEXTS = [f"Entry {i}: {'alpha ' * (i % 6)}{'béta ' * (i % 4)}stop {i * 7}." for i in range(40)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


def module_on(tokenizer, share: dict, workers: int, **settings) -> TextDataModule:
    module = TextDataModule(tokenizer, TEXTS, **{"block_size": 8, "batch_size": 5, "val_fraction": 0.1, "cache": False,
                                                 "num_workers": workers, **settings})
    module.setup("fit")
    module.trainer = SimpleNamespace(distributed_sampler_kwargs=share or None,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return module


def close(loader) -> None:
    # Persistent workers of a loader left to the garbage collector took torch's 5 s join timeout each here.
    if getattr(loader, "_iterator", None) is not None and hasattr(loader._iterator, "_shutdown_workers"):
        loader._iterator._shutdown_workers()


def epoch_batches(loader, epoch: int) -> list[torch.Tensor]:
    iterator = iter(loader)  # Lightning asks for the iterator before set_epoch
    loader.sampler.set_epoch(epoch)
    return [batch["input_ids"] for batch in iterator]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("share", [{}, {"num_replicas": 2, "rank": 0}, {"num_replicas": 2, "rank": 1}])
def test_a_loader_resumed_at_any_batch_reads_the_batches_of_an_uninterrupted_one(tokenizer, workers, share):
    module = module_on(tokenizer, share, workers)
    loader = module.train_dataloader()
    full = {epoch: epoch_batches(loader, epoch) for epoch in (0, 1)}
    rows = len(loader.sampler)
    assert rows % 5, "the data should leave a short last batch"
    assert not any(torch.equal(a, b) for a, b in zip(full[0], full[1]))  # epochs differ
    for epoch in (0, 1):
        count = len(full[epoch])
        stops = range(count + 1) if workers == 0 else sorted({0, 1, count - 1, count})  # the short batch, the end
        for consumed in stops:
            resumed = module_on(tokenizer, share, workers).train_dataloader()
            resumed.load_state_dict({"epoch": epoch, "batches": consumed})
            got = epoch_batches(resumed, epoch)
            want = full[epoch][consumed:]
            assert len(got) == len(want), (epoch, consumed)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (epoch, consumed)
            # the resume point is used once: the next epoch is whole
            nxt = epoch_batches(resumed, epoch + 1)
            close(resumed)
            assert len(nxt) == count
    close(loader)


def test_packing_keeps_documents_apart_at_every_size(tokenizer):
    documents = ["", "日本語 🎉 ünïcode", "x" * 0 + "alpha " * 30, "seven!"]
    tokenized = tokenize_documents(documents, tokenizer)
    assert [tokenizer.decode(tokenized.document(i)) for i in range(len(tokenized))] == [
        text + "<|eos|>" for text in documents]
    lengths = tokenized.lengths.tolist()
    block = lengths[1]  # the unicode document is exactly one block
    rows = pack_documents(tokenized.select(range(1, len(tokenized))), block, pad_id=0)
    assert rows["position_ids"][0].tolist() == list(range(block))
    assert rows["position_ids"][1, 0] == 0  # the next document starts a row and restarts
    flat = rows["input_ids"].flatten()
    total = sum(lengths[1:])
    assert torch.equal(flat[:total], tokenized.select(range(1, len(tokenized))).tokens)
    labels = rows["labels"].flatten()
    assert (labels[total:] == IGNORE_INDEX).all() and (labels[:total] != IGNORE_INDEX).all()
    # a document longer than a block restarts at each block start and counts on within a row
    long = TokenizedDocuments.from_lists([[5] * 3, [6] * 11])
    positions = pack_documents(long, 4, 0)["position_ids"].tolist()
    assert positions == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]  # padding: its own run


@pytest.mark.parametrize("setting, value, words", [
    ("batch_size", 0, "batch_size"), ("batch_size", -2, "batch_size"), ("block_size", 0, "block_size"),
    ("block_size", -1, "block_size"), ("block_size", "8", "block_size"), ("num_workers", -1, "num_workers"),
    ("max_documents", -1, "max_documents"), ("max_tokens", -5, "max_tokens"), ("val_fraction", 1.0, "val_fraction"),
])
def test_a_bad_setting_is_one_line_naming_it_before_any_data_is_read(tokenizer, setting, value, words):
    def never():
        raise AssertionError("the documents were read before the settings were checked")

    with pytest.raises(Exception) as caught:
        TextDataModule(tokenizer, never, **{setting: value})
    line = reported(caught.value)
    assert f"{words}={value!r}" in line and "command line" in line, line


@pytest.mark.parametrize("documents", ["a plain string, not a list of texts", b"bytes", Path("corpus.txt")])
def test_documents_given_as_one_string_are_refused_not_read_character_by_character(tokenizer, documents):
    module = TextDataModule(tokenizer, documents, block_size=8, batch_size=2, cache=False)
    with pytest.raises(Exception) as caught:
        module.setup("fit")
    line = reported(caught.value)
    assert "documents" in line and "list" in line, line


def test_a_document_that_is_not_text_is_one_line_naming_it(tokenizer):
    module = TextDataModule(tokenizer, [*TEXTS[:5], None, *TEXTS[5:]], block_size=8, batch_size=2, cache=False)
    with pytest.raises(Exception) as caught:
        module.setup("fit")
    line = reported(caught.value)
    assert "document 5" in line and "NoneType" in line, line


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "notepad.jsonl"
    path.write_bytes("\ufeff".encode() + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]).encode())
    assert jsonl_documents(path) == TEXTS[:3]


def test_a_text_file_with_a_byte_order_mark_does_not_keep_it(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffhello there".encode())
    assert text_documents(tmp_path) == ["hello there"]


def test_a_text_file_named_twice_is_refused_so_it_cannot_land_in_train_and_validation(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("one")
    (tmp_path / "docs" / "b.txt").write_text("two")
    with pytest.raises(Exception) as caught:
        text_documents([tmp_path / "docs", tmp_path / "docs" / "a.txt"])
    line = reported(caught.value)
    assert "a.txt" in line and "twice" in line, line


def test_a_glob_in_data_paths_says_to_give_the_directory_and_pattern(tmp_path):
    (tmp_path / "a.md").write_text("one")
    with pytest.raises(Exception) as caught:
        text_documents(tmp_path / "*.md")
    line = reported(caught.value)
    assert f"data_paths={tmp_path}" in line and "data_pattern='*.md'" in line, line
    assert text_documents(tmp_path, pattern="*.md") == ["one"]


def test_a_lone_surrogate_is_one_line_naming_the_line_or_document(tmp_path, tokenizer):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')  # valid JSON, but no UTF-8 text
    with pytest.raises(Exception) as caught:
        jsonl_documents(path)
    line = reported(caught.value)
    assert f"{path}:2:" in line and "surrogate" in line and "fix the line" in line and "set field" not in line, line
    module = TextDataModule(tokenizer, ["fine", "bad \ud800 here"], block_size=8, batch_size=2, cache=False)
    with pytest.raises(Exception) as caught:
        module.setup("fit")
    line = reported(caught.value)
    assert "document 1" in line and "surrogate" in line, line
