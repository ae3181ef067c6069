"""The embedded stdlib corpus: real English, MB-scale, deterministic, cached atomically."""

import collections
import json
import re
import subprocess
import sys

import pytest

from forgather.data import cache, corpus


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One extraction for the whole module, into a private cache directory."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.CACHE_ENV, str(root))
        corpus.stdlib_corpus_path()
        yield root


@pytest.fixture(scope="module")
def records(cache_root):
    return corpus.stdlib_records()


def test_corpus_is_megabytes_of_documents(records):
    assert len(records) > 2000
    assert sum(len(record["text"]) for record in records) > 1_500_000


def test_common_english_words_dominate(records):
    words = collections.Counter(word for record in records for word in re.findall(r"[a-z]+", record["text"].lower()))
    top = [word for word, _ in words.most_common(10)]
    assert top[0] == "the"
    assert {"a", "of", "to", "is", "and"} <= set(top)
    function_words = {"the", "a", "an", "of", "to", "is", "and", "in", "for", "be", "or", "that", "this", "it"}
    assert sum(words[word] for word in function_words) / sum(words.values()) > 0.2


def test_corpus_holds_pydoc_topics_then_docstrings(records):
    kinds = [record["source"].split(":")[0] for record in records]
    num_topics = kinds.count("topic")
    assert num_topics > 50
    assert kinds == ["topic"] * num_topics + ["doc"] * (len(kinds) - num_topics)


def test_documents_are_long_enough_and_unique(records):
    texts = [record["text"] for record in records]
    assert min(map(len, texts)) >= corpus.DEFAULT_MIN_CHARS
    assert len(set(texts)) == len(texts)


def test_extraction_is_deterministic(records):
    assert list(corpus.extract_stdlib_corpus()) == records


def test_cache_lives_under_the_cache_env_dir_keyed_by_python_version(cache_root):
    path = corpus.stdlib_corpus_path()
    assert path.parent == cache_root / "corpus"
    assert f"{sys.version_info.major}.{sys.version_info.minor}." in path.name


def test_second_call_reads_the_cache(cache_root, records, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("the cached corpus should have been read")

    monkeypatch.setattr(corpus, "extract_stdlib_corpus", no_extraction)
    assert corpus.stdlib_documents() == [record["text"] for record in records]


def test_max_documents_keeps_the_first_documents(cache_root, records):
    assert corpus.stdlib_documents(max_documents=7) == [record["text"] for record in records[:7]]


def test_extraction_runs_no_module_it_reads():
    script = (
        "import sys; from forgather.data.corpus import extract_stdlib_corpus; "
        "n = sum(1 for _ in extract_stdlib_corpus()); print(n, *sorted(sys.modules))"
    )
    count, *imported = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(count) > 2000
    # Modules with import-time side effects (printing, opening a browser, a GUI toolkit) among those read.
    assert not {"this", "antigravity", "tkinter", "turtle", "idlelib", "lib2to3", "asyncio"} & set(imported)


def test_module_walk_skips_tests_and_unparsable_files(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text('"""Package docs."""\n')
    (tmp_path / "pkg" / "tests" / "__init__.py").write_text('"""Test docs."""\n')
    (tmp_path / "pkg" / "mod.py").write_text('"""Module docs."""\nclass A:\n    """Class docs."""\n')
    (tmp_path / "broken.py").write_text('"""Broken docs."""\ndef (:\n')

    modules = [name for name, _ in corpus.stdlib_module_files(tmp_path)]
    assert modules == ["broken", "pkg", "pkg.mod"]
    files = corpus.stdlib_module_files(tmp_path)
    texts = [text for name, path in files for _, text in corpus.module_docstrings(name, path)]
    assert texts == ["Package docs.", "Module docs.", "Class docs."]


def test_atomic_writes_give_ordinary_permissions(tmp_path):
    cache.atomic_write(tmp_path / "file.txt", lambda tmp: tmp.write_text("x"))
    with cache.atomic_directory(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("y")
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "inside.txt").read_text() == "y"


def test_atomic_write_failure_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")

    def half_write(tmp):
        tmp.write_text(json.dumps({"text": "partial"}))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write(target, half_write)
    assert target.read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["data.jsonl"]
