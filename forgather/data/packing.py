"""Sequence packing: documents -> token ids -> fixed-length blocks that keep document boundaries.

`tokenize_documents` encodes each document (text only: special-token strings inside a document are encoded
as plain text) and appends `<|eos|>`, giving `TokenizedDocuments` (one flat token tensor + document
lengths). `pack_documents` concatenates the documents and cuts the stream into blocks of `block_size`
tokens. Per block:
- `input_ids`: the tokens; the final block is filled up with the pad id;
- `position_ids`: 0 at every document start, counting up within the document. A document that runs over
  a block boundary restarts at 0 at the block start: the model treats position 0 as "no earlier context in
  this row", which is exactly what the continuation sees, and positions never exceed `block_size - 1`.
  The padding run counts as a document of its own, so document masks never join it to real text;
- `labels`: `input_ids` with padding set to -100 (the loss shifts labels by one itself).
Every token of the input appears exactly once, in order. Deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

IGNORE_INDEX = -100
BLOCK_FIELDS = ("input_ids", "position_ids", "labels")


class TokenizedDocuments(NamedTuple):
    """Documents as one flat token stream plus per-document lengths (compact: no Python int per token)."""

    tokens: torch.Tensor  # LongTensor [total tokens]
    lengths: torch.Tensor  # LongTensor [documents]

    @classmethod
    def from_lists(cls, documents: Sequence[Sequence[int]]) -> TokenizedDocuments:
        flat = list(itertools.chain.from_iterable(documents))
        return cls(torch.tensor(flat, dtype=torch.long), torch.tensor([len(d) for d in documents], dtype=torch.long))

    def __len__(self) -> int:
        return self.lengths.numel()

    def document(self, index: int) -> list[int]:
        start = int(self.lengths[:index].sum())
        return self.tokens[start : start + int(self.lengths[index])].tolist()

    def select(self, indices: Iterable[int]) -> TokenizedDocuments:
        """The documents at `indices`, kept in their original order."""
        keep = torch.zeros(len(self), dtype=torch.bool)
        keep[list(indices)] = True
        return TokenizedDocuments(self.tokens[keep.repeat_interleave(self.lengths)], self.lengths[keep])


def tokenize_documents(
    documents: Iterable[str], tokenizer, max_tokens: int | None = None, chunk_size: int = 256
) -> TokenizedDocuments:
    """Token ids of each document with `eos` appended; stops once `max_tokens` tokens are collected
    (the document that crosses the budget is cut short, keeping its eos, so the total is exactly the budget)."""
    eos = _require_id(tokenizer, "eos_token_id")
    if max_tokens is not None and max_tokens < 1:  # no room even for one eos: no document
        return _concatenate([])
    chunks, total = [], 0
    for texts in _chunks(documents, chunk_size):
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        chunk = []
        for ids in encoded:
            if max_tokens is not None and total + len(ids) + 1 >= max_tokens:
                chunk.append([*ids[: max_tokens - total - 1], eos])
                chunks.append(TokenizedDocuments.from_lists(chunk))
                return _concatenate(chunks)
            chunk.append([*ids, eos])
            total += len(ids) + 1
        chunks.append(TokenizedDocuments.from_lists(chunk))
    return _concatenate(chunks)


def _concatenate(parts: list[TokenizedDocuments]) -> TokenizedDocuments:
    if not parts:
        return TokenizedDocuments.from_lists([])
    return TokenizedDocuments(torch.cat([part.tokens for part in parts]), torch.cat([part.lengths for part in parts]))


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _require_id(tokenizer, attribute: str) -> int:
    token_id = getattr(tokenizer, attribute, None)
    if token_id is None:
        raise ValueError(f"packing needs a tokenizer with {attribute} set; {type(tokenizer).__name__} has none")
    return token_id


def pack_documents(documents: TokenizedDocuments, block_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate tokenized documents and cut them into blocks: LongTensors [num_blocks, block_size]."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens, lengths = documents
    num_tokens = tokens.numel()
    padded = -(-num_tokens // block_size) * block_size
    num_pad = padded - num_tokens

    input_ids = torch.cat([tokens, torch.full((num_pad,), pad_id, dtype=torch.long)])
    labels = input_ids.clone()
    labels[num_tokens:] = IGNORE_INDEX

    # Each token's document start (the padding run starts its own document), then restart at block starts.
    document_starts = torch.cumsum(lengths, 0) - lengths
    token_starts = torch.cat([document_starts.repeat_interleave(lengths), torch.full((num_pad,), num_tokens)])
    index = torch.arange(padded)
    block_starts = index - index % block_size
    position_ids = index - torch.maximum(token_starts, block_starts)

    fields = (input_ids, position_ids, labels)
    return {name: tensor.view(-1, block_size) for name, tensor in zip(BLOCK_FIELDS, fields, strict=True)}


class PackedDataset(Dataset):
    """Packed blocks as a map-style dataset: item i is `{"input_ids", "position_ids", "labels"}` rows,
    so the default collate gives LongTensor[B, T] batches."""

    def __init__(self, blocks: dict[str, torch.Tensor]):
        self.blocks = {name: blocks[name] for name in BLOCK_FIELDS}

    def __len__(self) -> int:
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:  # a padding row of an evaluation share (forgather.data.loader.EvenShareSampler)
            row = {name: tensor[-1 - index] for name, tensor in self.blocks.items()}
            return {**row, "labels": torch.full_like(row["labels"], IGNORE_INDEX)}
        return {name: tensor[index] for name, tensor in self.blocks.items()}


def save_datasets(path: Path, datasets: dict[str, PackedDataset]) -> None:
    """Write named datasets (e.g. train and val) into one safetensors file, keys `<name>.<field>`."""
    tensors = {
        f"{name}.{field}": tensor.contiguous()
        for name, dataset in datasets.items()
        for field, tensor in dataset.blocks.items()
    }
    save_file(tensors, str(path))


def load_datasets(path: Path) -> dict[str, PackedDataset]:
    """Read the datasets written by `save_datasets`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, field = key.rpartition(".")
        grouped.setdefault(name, {})[field] = tensor
    return {name: PackedDataset(blocks) for name, blocks in grouped.items()}
