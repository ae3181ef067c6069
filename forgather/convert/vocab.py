"""Tokenizers of model directories, and growing a vocabulary during conversion.

`load_tokenizer(dir)` loads the tokenizer saved beside a model (Hugging Face or Forgather directory).
`add_tokens(tokenizer, tokens, special)` adds tokens; `resize_vocab(state, old, new)` grows the embedding and
an untied head (Forgather names) to the new size. New rows start at the mean of the old ones (Hewitt, 2021,
"Initializing new word embeddings"): a new token's logit then starts near the average instead of at random.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .directory import is_forgather_directory

# Files that make up a saved tokenizer, copied as they are when the vocabulary does not change.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in `directory`: a fast tokenizer from tokenizer.json in a Forgather directory (whose
    model_type AutoTokenizer does not know, and would ask on stdin about its remote code), else AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if is_forgather_directory(directory):
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def add_tokens(tokenizer: Any, tokens: list[str], special: bool) -> int:
    """Add the tokens the tokenizer does not know yet; returns how many were new."""
    return tokenizer.add_tokens(tokens, special_tokens=special)


def padded_size(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def resize_vocab(state: dict[str, torch.Tensor], new_size: int) -> dict[str, torch.Tensor]:
    """Grow `embed.weight` (and `lm_head.weight` when present) to `new_size` rows; never shrinks."""
    resized = dict(state)
    for name in ("embed.weight", "lm_head.weight"):
        if name not in state:
            continue
        weight = state[name]
        if new_size < weight.shape[0]:
            raise ValueError(f"vocab size {new_size} is smaller than the model's {weight.shape[0]}; it only grows")
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        resized[name] = torch.cat((weight, mean.expand(new_size - weight.shape[0], -1)))
    return resized


def grow_vocabulary(
    state: dict[str, torch.Tensor], vocab_size: int, tokenizer: Any | None, multiple: int
) -> tuple[dict[str, torch.Tensor], int]:
    """(state, size) after growing to hold every token of `tokenizer`, rounded up to a multiple of `multiple`.

    A model whose vocabulary is already large enough (checkpoints often pad it) keeps its size.
    """
    needed = max(vocab_size, len(tokenizer) if tokenizer is not None else 0)
    new_size = padded_size(needed, multiple) if needed > vocab_size else vocab_size
    return (resize_vocab(state, new_size), new_size) if new_size != vocab_size else (state, vocab_size)
