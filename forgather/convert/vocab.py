"""Tokenizers of model directories, and what a conversion changes in them.

`load_tokenizer(dir)` loads the tokenizer saved beside a model (Hugging Face or Forgather directory).
`VocabOptions` says what a conversion changes: tokens to add (regular or special), the named roles (bos, eos,
pad, unk) to set, a chat template, and the multiple the vocabulary is padded to. `read_token_file` reads the
reference Forgather's `--add-tokens` YAML file into one:

    bos_token: "<|begin_of_text|>"          # a role: the token (added when new) becomes the tokenizer's bos
    pad_token: {token: "<|pad|>", init: zero, if_missing: true}   # set only when the tokenizer has no pad
    special_tokens: ["<|im_start|>"]        # added as special tokens
    regular_tokens: ["custom_token"]        # added as ordinary tokens

`apply_vocab(tokenizer, options)` makes the changes and returns the new tokens' ids with their row
initialization; `grow_vocabulary` grows the embedding (and an untied head) to hold them, and `initialize_rows`
sets each new token's rows: the mean of the rows of the tokens the tokenizer had (Hewitt, 2021, "Initializing
new word embeddings": its logit then starts near the average instead of at random), or zero (the reference's
default for pad). A new token's rows are set even when the vocabulary was already large enough (checkpoints
often pad it): those rows held no trained token.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .directory import is_forgather_directory

# Files that make up a saved tokenizer, copied as they are when the vocabulary does not change.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
INITS = ("mean", "zero")
_FILE_KEYS = (*ROLES, "special_tokens", "regular_tokens")


@dataclasses.dataclass(frozen=True)
class RoleToken:
    """A token for one of the tokenizer's roles (ROLES): `init` its new rows' start (INITS), `if_missing` set
    only when the tokenizer has no token in that role."""

    token: str
    init: str = "mean"
    if_missing: bool = False


@dataclasses.dataclass
class VocabOptions:
    """What a conversion changes in the tokenizer and the vocabulary: `tokens` to add (special ones when
    `special`), `special_tokens` always added as special, `roles` (ROLES -> RoleToken), a `chat_template`
    (its text); then the vocabulary is padded up to a multiple of `pad_to_multiple_of`."""

    tokens: Sequence[str] = ()
    special: bool = False
    pad_to_multiple_of: int = 1
    special_tokens: Sequence[str] = ()
    roles: Mapping[str, RoleToken] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None

    def changes_tokenizer(self) -> bool:
        return bool(self.tokens or self.special_tokens or self.roles or self.chat_template is not None)


def read_token_file(path: str | Path) -> VocabOptions:
    """The reference Forgather's `--add-tokens` YAML file (see the module docstring) as VocabOptions; a key or
    value it does not know is an error naming the file and the key."""
    from forgather.errors import did_you_mean
    from forgather.yaml_file import read_mapping

    path = Path(path).expanduser()
    content, lines = read_mapping(path, f"a YAML file of tokens to add ({', '.join(_FILE_KEYS)})")

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    def strings(key: str) -> list[str]:
        value = content.get(key) or []
        if not isinstance(value, list) or not all(isinstance(token, str) for token in value):
            raise ValueError(f"{where(key)}: {key}: a list of token strings expected, got {value!r}")
        return value

    for key in content:
        if key not in _FILE_KEYS:
            hint = did_you_mean(str(key), _FILE_KEYS)
            raise ValueError(f"{where(str(key))}: unknown key {key!r}; " + (hint or f"the keys are {', '.join(_FILE_KEYS)}"))
    roles = {}
    for role in ROLES:
        value = content.get(role)
        if value is None:
            continue
        default_init = "zero" if role == "pad_token" else "mean"
        if isinstance(value, str):
            value = {"token": value}
        if not isinstance(value, dict) or not isinstance(value.get("token"), str):
            raise ValueError(f"{where(role)}: {role}: a token string, or a mapping with `token` (and `init`, "
                             f"`if_missing`), expected, got {value!r}")
        unknown = set(value) - {"token", "init", "if_missing"}
        if unknown:
            raise ValueError(f"{where(role)}: {role}: unknown key {sorted(unknown)[0]!r}; the keys are token, init, if_missing")
        init = value.get("init", default_init)
        if init not in INITS:
            raise ValueError(f"{where(role)}: {role}: init {init!r}; use one of {', '.join(INITS)}")
        roles[role] = RoleToken(value["token"], init, bool(value.get("if_missing", False)))
    return VocabOptions(tokens=strings("regular_tokens"), special_tokens=strings("special_tokens"), roles=roles)


def apply_vocab(tokenizer: Any, options: VocabOptions) -> dict[int, str]:
    """Make `options`' changes to `tokenizer`; returns {id: init} for each token it did not have before."""
    before = len(tokenizer)
    inits: dict[int, str] = {}
    tokenizer.add_tokens(list(options.tokens), special_tokens=options.special)
    tokenizer.add_tokens(list(options.special_tokens), special_tokens=True)
    for role, wanted in options.roles.items():
        if wanted.if_missing and getattr(tokenizer, role) is not None:
            continue
        tokenizer.add_special_tokens({role: wanted.token})  # adds the token when new, and points the role at it
        token_id = tokenizer.convert_tokens_to_ids(wanted.token)
        if token_id >= before:
            inits[token_id] = wanted.init
    if options.chat_template is not None:
        tokenizer.chat_template = options.chat_template
    return {token_id: inits.get(token_id, "mean") for token_id in range(before, len(tokenizer))}


def initialize_rows(state: dict[str, torch.Tensor], inits: Mapping[int, str]) -> dict[str, torch.Tensor]:
    """Set the embedding (and untied head) rows of new tokens: {id: "mean" or "zero"}, as apply_vocab returns
    them; the mean is over the rows of the tokens the tokenizer had, the ids below the first new one."""
    if not inits:
        return state
    known = min(inits)  # a tokenizer numbers the tokens it adds after those it has
    initialized = dict(state)
    for name in ("embed.weight", "lm_head.weight"):
        if name not in state:
            continue
        weight = state[name].clone()
        mean = weight[:known].float().mean(dim=0).to(weight.dtype)
        for token_id, init in inits.items():
            weight[token_id] = mean if init == "mean" else 0
        initialized[name] = weight
    return initialized


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
