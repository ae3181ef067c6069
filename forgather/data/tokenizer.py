"""Byte-level BPE tokenizers trained with the `tokenizers` library, cached, handed out as HF fast tokenizers.

`train_bpe_tokenizer(documents, vocab_size)` trains a byte-level BPE (GPT-2 style: any byte sequence
round-trips, no unknown token) with the special tokens `<|pad|>`, `<|bos|>`, `<|eos|>` at ids 0, 1, 2.
The result is a `transformers.PreTrainedTokenizerFast`, so model export and inference can `save_pretrained`
it beside the weights. Trained tokenizers are cached under `<cache>/tokenizers/bpe-<key>/`, the key a hash
of (corpus identity, vocab size, min frequency); the corpus identity is the caller's `corpus_id` or, when
none is given, a hash of the documents' text. `load_tokenizer(path)` loads a saved one.
Encoding adds no special tokens; packing appends `<|eos|>` after each document itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from forgather.data.cache import atomic_directory, cache_dir, documents_fingerprint, fingerprint
from forgather.data.sources import Documents, resolve_documents
from forgather.errors import UserError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = {"pad_token": PAD_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
# Bump when the training recipe changes, so stale cached tokenizers are not reused.
TOKENIZER_FORMAT = 1


def build_bpe_tokenizer(documents: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `documents` (no cache)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # All 256 byte symbols up front: text never seen in training still encodes, and decodes back exactly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return _wrap(tokenizer)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # Name only the special tokens the vocabulary has: naming a missing one would add it as a new token.
    vocab = tokenizer.get_vocab()
    specials = {role: token for role, token in SPECIAL_TOKENS.items() if token in vocab}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **specials)


def train_bpe_tokenizer(
    documents: Documents,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    corpus_id: str | None = None,
    cache: bool = True,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `documents` (an iterable of texts, or a callable returning one),
    loaded from the cache when the same corpus and settings were trained before.

    With `corpus_id` the documents are only read on a cache miss; without it they are hashed to key the cache.
    """
    if not cache:
        return build_bpe_tokenizer(resolve_documents(documents), vocab_size, min_frequency)
    texts = None
    if corpus_id is None:
        texts = list(resolve_documents(documents))
        corpus_id = f"sha256:{documents_fingerprint(texts)}"
    path = cache_dir("tokenizers") / f"bpe-{fingerprint(TOKENIZER_FORMAT, corpus_id, vocab_size, min_frequency)}"
    if not path.is_dir():
        texts = resolve_documents(documents) if texts is None else texts
        tokenizer = build_bpe_tokenizer(texts, vocab_size, min_frequency)
        with atomic_directory(path) as tmp:
            tokenizer.save_pretrained(tmp)
    return load_tokenizer(path)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_pretrained` (a directory) or a bare `tokenizer.json` file."""
    path = Path(path)
    if path.is_file():
        return _read(path, lambda: _wrap(Tokenizer.from_file(str(path))))
    if not path.is_dir():  # else transformers takes it for a hub id: a download, or an error about repo ids
        raise FileNotFoundError(f"tokenizer {path}: no such file or directory; give a directory saved with "
                                f"save_pretrained (a model directory has one) or a tokenizer.json")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"tokenizer {path}: the directory has no tokenizer.json or tokenizer_config.json; "
                                f"give a directory saved with save_pretrained or a tokenizer.json")
    return _read(path, lambda: PreTrainedTokenizerFast.from_pretrained(str(path)))


def _read(path: Path, load: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    try:
        return load()
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"tokenizer {path}: cannot be read as a tokenizer ({reason}); give a tokenizer.json, or a "
                        f"directory saved with save_pretrained (a model directory has one)") from error


def stdlib_tokenizer(vocab_size: int = 8192, max_documents: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on (the first `max_documents` of) the embedded stdlib corpus, cached."""
    from forgather.data.corpus import stdlib_corpus_path, stdlib_documents

    corpus_id = f"{stdlib_corpus_path().name}[:{max_documents}]"
    return train_bpe_tokenizer(lambda: stdlib_documents(max_documents), vocab_size, corpus_id=corpus_id)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash identifying a tokenizer's behaviour: its full serialized form for fast tokenizers,
    else its class and vocabulary (for cache keys of tokenized data)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return fingerprint(backend.to_str())
    return fingerprint(type(tokenizer).__qualname__, sorted(tokenizer.get_vocab().items()))
