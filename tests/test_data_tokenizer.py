"""Byte-level BPE training, caching and loading."""

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from forgather.data import cache, tokenizer
from forgather.data.corpus import pydoc_topics

VOCAB = 600


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def documents():
    return [text for _, text in pydoc_topics()]


@pytest.fixture
def trained(documents):
    return tokenizer.train_bpe_tokenizer(documents, vocab_size=VOCAB)


@pytest.mark.parametrize(
    "text",
    ["The quick brown fox.", "  indented\n\tcode(x) -> y  ", "naïve café 🤖 東京", "<|eos|> is just text here"],
)
def test_text_round_trips(trained, text):
    ids = trained(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert trained.decode(ids) == text


def test_vocab_size_and_special_token_ids(trained):
    assert len(trained) == VOCAB
    assert (trained.pad_token_id, trained.bos_token_id, trained.eos_token_id) == (0, 1, 2)
    assert trained.convert_ids_to_tokens([0, 1, 2]) == ["<|pad|>", "<|bos|>", "<|eos|>"]


def test_merges_learn_english_words(trained):
    assert trained.tokenize(" the") == ["Ġthe"]


def test_second_training_reads_the_cache(documents, trained, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer, "build_bpe_tokenizer", no_training)
    again = tokenizer.train_bpe_tokenizer(documents, vocab_size=VOCAB)
    assert again.get_vocab() == trained.get_vocab()


def test_cache_key_separates_vocab_sizes_and_corpora(documents, private_cache):
    tokenizer.train_bpe_tokenizer(documents, vocab_size=VOCAB)
    tokenizer.train_bpe_tokenizer(documents, vocab_size=VOCAB + 50)
    tokenizer.train_bpe_tokenizer(documents[:20], vocab_size=VOCAB)
    assert len(list((private_cache / "tokenizers").iterdir())) == 3


def test_corpus_id_skips_reading_documents_on_a_cache_hit(documents):
    tokenizer.train_bpe_tokenizer(lambda: documents, vocab_size=VOCAB, corpus_id="topics")

    def unread():
        raise AssertionError("documents should not be read on a cache hit")

    assert len(tokenizer.train_bpe_tokenizer(unread, vocab_size=VOCAB, corpus_id="topics")) == VOCAB


def test_save_pretrained_loads_back_with_auto_tokenizer(trained, tmp_path):
    trained.save_pretrained(tmp_path / "export")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "Return the value of the named attribute."
    assert loaded(text)["input_ids"] == trained(text)["input_ids"]
    assert loaded.eos_token == "<|eos|>"


def test_load_tokenizer_from_directory_or_json_file(trained, tmp_path):
    trained.save_pretrained(tmp_path / "export")
    text = "Raise an exception."
    expected = trained(text)["input_ids"]
    for path in (tmp_path / "export", tmp_path / "export" / "tokenizer.json"):
        loaded = tokenizer.load_tokenizer(path)
        assert loaded(text)["input_ids"] == expected
        assert loaded.pad_token_id == 0


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_file_that_is_not_a_tokenizer_is_one_line_naming_it(tmp_path, capsys, where):
    """Was a traceback ending in tokenizers' bare `Exception: EOF while parsing a value` (a file), or a JSON
    error naming no file (a directory)."""
    from forgather.cli.main import main

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("")
    path = tmp_path / "tok" / "tokenizer.json" if where == "file" else tmp_path / "tok"
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    assert main(["data", "prepare", "--source", str(tmp_path / "a.jsonl"), "--tokenizer", str(path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: tokenizer {path}: cannot be read as a tokenizer (")
    assert err.endswith("); give a tokenizer.json, or a directory saved with save_pretrained (a model directory has one)\n")


def test_loading_a_foreign_tokenizer_json_adds_no_tokens(tmp_path):
    foreign = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign.save(str(tmp_path / "tokenizer.json"))
    loaded = tokenizer.load_tokenizer(tmp_path / "tokenizer.json")
    assert len(loaded) == 3
    assert loaded.eos_token_id is None


def test_training_is_deterministic_across_processes(documents):
    script = (
        "from forgather.data.corpus import pydoc_topics; from forgather.data import tokenizer as t; "
        f"print(t.tokenizer_fingerprint(t.build_bpe_tokenizer([x for _, x in pydoc_topics()], {VOCAB})))"
    )
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    here = tokenizer.tokenizer_fingerprint(tokenizer.build_bpe_tokenizer(documents, VOCAB))
    assert other_process.stdout.strip() == here


def test_fingerprint_tells_tokenizers_apart(documents, trained):
    other = tokenizer.train_bpe_tokenizer(documents, vocab_size=VOCAB + 50)
    assert tokenizer.tokenizer_fingerprint(trained) == tokenizer.tokenizer_fingerprint(
        tokenizer.train_bpe_tokenizer(documents, vocab_size=VOCAB)
    )
    assert tokenizer.tokenizer_fingerprint(trained) != tokenizer.tokenizer_fingerprint(other)
