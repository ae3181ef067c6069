"""Packing keeps document boundaries; the split is disjoint; loading order is a function of (seed, epoch)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forgather.data.loader import EpochShuffleSampler, LoaderPosition, ResumableDataLoader
from forgather.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    TokenizedDocuments,
    load_datasets,
    pack_documents,
    save_datasets,
    tokenize_documents,
)
from forgather.data.split import split_documents
from forgather.data.tokenizer import build_bpe_tokenizer

PAD = 0

document_lists = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12)


def make_documents(lengths):
    """Documents of the given lengths whose tokens are all distinct (so order is checkable)."""
    tokens = itertools.count(1)
    return TokenizedDocuments.from_lists([[next(tokens) for _ in range(length)] for length in lengths])


def expected_starts(lengths, num_tokens, padded, block_size):
    """Flat indices where position 0 must appear: document starts, block starts, the padding run start."""
    document_starts = set(itertools.accumulate([0, *lengths[:-1]]))
    padding_start = {num_tokens} if padded > num_tokens else set()
    return document_starts | set(range(0, padded, block_size)) | padding_start


@settings(max_examples=60, deadline=None)
@given(lengths=document_lists, block_size=st.integers(min_value=1, max_value=32))
def test_position_ids_restart_exactly_at_document_and_block_starts(lengths, block_size):
    blocks = pack_documents(make_documents(lengths), block_size, PAD)
    positions = blocks["position_ids"].flatten()
    starts = expected_starts(lengths, sum(lengths), positions.numel(), block_size)
    assert set(torch.nonzero(positions == 0).flatten().tolist()) == starts
    steps = positions[1:] - positions[:-1]
    assert bool(((steps == 1) | (positions[1:] == 0)).all())


@settings(max_examples=60, deadline=None)
@given(lengths=document_lists, block_size=st.integers(min_value=1, max_value=32))
def test_every_token_appears_once_in_order(lengths, block_size):
    documents = make_documents(lengths)
    blocks = pack_documents(documents, block_size, PAD)
    labels = blocks["labels"].flatten()
    real = blocks["input_ids"].flatten()[labels != IGNORE_INDEX]
    assert real.tolist() == documents.tokens.tolist()
    assert torch.equal(labels[labels != IGNORE_INDEX], real)


def test_only_the_padding_tail_is_ignored():
    blocks = pack_documents(make_documents([3, 4]), block_size=4, pad_id=PAD)
    assert blocks["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, PAD]]
    assert blocks["labels"].tolist() == [[1, 2, 3, 4], [5, 6, 7, IGNORE_INDEX]]
    assert blocks["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 0]]


def test_blocks_are_long_tensors_of_block_size():
    blocks = pack_documents(make_documents([5, 9, 2]), block_size=8, pad_id=PAD)
    for tensor in blocks.values():
        assert tensor.dtype == torch.long
        assert tensor.shape == (2, 8)


def test_no_documents_give_no_blocks():
    assert pack_documents(make_documents([]), block_size=8, pad_id=PAD)["input_ids"].shape == (0, 8)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    texts = ["the cat sat on the mat", "a dog ate the bone", "the end of the story"] * 5
    return build_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)


def test_tokenize_appends_eos_and_keeps_special_token_text_as_text(tiny_tokenizer):
    tokenized = tokenize_documents(["the cat", "say <|eos|> twice"], tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    documents = [tokenized.document(index) for index in range(len(tokenized))]
    assert [document[-1] for document in documents] == [eos, eos]
    assert all(eos not in document[:-1] for document in documents)
    assert tiny_tokenizer.decode(documents[1][:-1]) == "say <|eos|> twice"


def test_tokenize_stops_at_exactly_max_tokens(tiny_tokenizer):
    documents = ["the cat sat on the mat"] * 10
    full = tokenize_documents(documents, tiny_tokenizer, chunk_size=4)
    budget = int(full.lengths[0]) * 5 + 3
    limited = tokenize_documents(documents, tiny_tokenizer, max_tokens=budget, chunk_size=4)
    assert limited.tokens.numel() == int(limited.lengths.sum()) == budget
    assert len(limited) == 6
    assert torch.equal(limited.tokens[:-1], full.tokens[: budget - 1])
    assert limited.document(5)[-1] == tiny_tokenizer.eos_token_id
    for budget in (0, 1):
        assert tokenize_documents(documents, tiny_tokenizer, max_tokens=budget).tokens.numel() == budget


def test_selecting_documents_keeps_their_tokens_and_order():
    documents = make_documents([2, 3, 1, 4])
    chosen = documents.select([3, 1])
    assert chosen.lengths.tolist() == [3, 4]
    assert [chosen.document(0), chosen.document(1)] == [documents.document(1), documents.document(3)]


def test_split_is_disjoint_complete_and_seeded():
    items = list(range(100))
    train, val = split_documents(items, val_fraction=0.1, seed=3)
    assert len(val) == 10
    assert sorted(train + val) == items
    assert not set(train) & set(val)
    assert split_documents(items, 0.1, seed=3) == (train, val)
    assert split_documents(items, 0.1, seed=4)[1] != val


def test_split_keeps_one_validation_document_and_one_training_document():
    assert split_documents(["a", "b"], val_fraction=0.01, seed=0)[1] != []
    assert split_documents(["a", "b"], val_fraction=0.99, seed=0)[0] != []
    assert split_documents(["a"], val_fraction=0.5, seed=0) == (["a"], [])


def test_sampler_order_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    assert list(EpochShuffleSampler(50, seed=7)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert first == torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()  # runs' epoch 0 kept


def test_another_seeds_epochs_are_not_this_seeds_later_epochs():
    """A sweep over seeds: seed 8's first epoch must not be seed 7's second (as with seed + epoch)."""
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochShuffleSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    orders = [order(seed, epoch) for seed in range(7, 11) for epoch in range(4)]
    assert len({tuple(o) for o in orders}) == len(orders)


def test_resumable_loader_skips_consumed_batches_of_the_saved_epoch_only():
    dataset = list(range(10))
    position = LoaderPosition()
    loader = ResumableDataLoader(dataset, batch_size=2, sampler=EpochShuffleSampler(10, seed=1), position=position)
    loader.sampler.set_epoch(3)
    full = [batch.tolist() for batch in loader]
    for _ in range(2):
        position.advance(epoch=3)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}

    restored = ResumableDataLoader(dataset, batch_size=2, sampler=EpochShuffleSampler(10, seed=1))
    restored.load_state_dict(state)
    restored.sampler.set_epoch(3)
    assert [batch.tolist() for batch in restored] == full[2:]
    assert [batch.tolist() for batch in restored] == full

    other_epoch = ResumableDataLoader(dataset, batch_size=2, sampler=EpochShuffleSampler(10, seed=1))
    other_epoch.load_state_dict(state)
    other_epoch.sampler.set_epoch(4)
    assert len(list(other_epoch)) == 5


def test_datasets_round_trip_through_one_file(tmp_path):
    train = PackedDataset(pack_documents(make_documents([5, 9]), 4, PAD))
    empty = PackedDataset(pack_documents(make_documents([]), 4, PAD))
    save_datasets(tmp_path / "blocks.safetensors", {"train": train, "val": empty})
    loaded = load_datasets(tmp_path / "blocks.safetensors")
    assert len(loaded["val"]) == 0
    assert all(torch.equal(loaded["train"].blocks[key], train.blocks[key]) for key in train.blocks)
    assert set(loaded["train"][1]) == {"input_ids", "position_ids", "labels"}


def test_a_resume_point_is_kept_for_the_pass_that_starts_not_for_an_iter_left_unused():
    # Lightning may call iter() on a loader and start the pass from a later iter(); and a resumed fit calls iter()
    # before set_epoch, which the pass must read only when its first batch is drawn (here with workers).
    dataset = list(range(12))
    loader = ResumableDataLoader(dataset, batch_size=2, sampler=EpochShuffleSampler(12, seed=1), num_workers=2)
    loader.sampler.set_epoch(1)
    epoch1 = [batch.tolist() for batch in loader]
    restored = ResumableDataLoader(dataset, batch_size=2, sampler=EpochShuffleSampler(12, seed=1), num_workers=2)
    restored.load_state_dict({"epoch": 1, "batches": 2})
    iter(restored)
    started = iter(restored)
    restored.sampler.set_epoch(1)
    assert [batch.tolist() for batch in started] == epoch1[2:]
