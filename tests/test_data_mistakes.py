"""A user's data mistakes are one line naming the file (and line or row) and what to do; never a traceback, and
never a run that trains on nothing or validates on nothing without saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgather.data import prepare as prep
from forgather.data.sources import jsonl_documents, text_documents
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.errors import UserError, describe
from forgather.lightning.datamodule import NoValidationWarning, TextDataModule

TEXTS = [f"Document {i} says {'hello ' * (i % 5)}and then ends." for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


def reported(error: BaseException) -> str:
    """The line the user sees: a mistake (not a bug's traceback), on one line."""
    line = describe(error)
    assert line is not None and "\n" not in line, f"not a one-line mistake: {error!r}"
    return line


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def prepared(tokenizer, tmp_path: Path) -> Path:
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    return Path(prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)["path"])


# ---- forgather data prepare ---------------------------------------------------------------------------


def test_prepare_names_a_plain_directory_given_as_source(tokenizer, tmp_path):
    (tmp_path / "docs").mkdir()
    with pytest.raises(UserError) as error:
        prep.prepare([tmp_path / "docs"], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    assert "docs: a directory, not a dataset saved with save_to_disk; give a glob of its files" in reported(error.value)


def test_prepare_says_when_every_document_fell_in_validation(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "one.jsonl", ["the only document"])
    with pytest.raises(UserError) as error:
        prep.prepare([source], tokenizer, tmp_path / "out", val_fraction=0.999, num_workers=1, progress=False)
    line = reported(error.value)
    assert "one.jsonl: every document of the corpus (1) fell in the validation split (val_fraction=0.999)" in line
    assert "set val_fraction 0 (--val-fraction 0)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, -1])
def test_prepare_refuses_fewer_than_one_worker(tokenizer, tmp_path, workers):
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    with pytest.raises(UserError) as error:
        prep.prepare([source], tokenizer, tmp_path / "out", num_workers=workers, progress=False)
    assert f"num_workers must be at least 1, got {workers}; give a number of processes (--workers N" in reported(error.value)


def test_prepare_names_the_row_of_a_column_that_is_not_text(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [7, 8]}), tmp_path / "numbers.parquet")
    with pytest.raises(UserError) as error:
        prep.prepare([tmp_path / "numbers.parquet"], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    assert "numbers.parquet: row 0: column 'text' holds int 7, not text; set the field to a text column" in reported(error.value)


@pytest.mark.parametrize("damage, what", [
    (lambda text: text[:100], "not JSON"),
    (lambda text: "[]", "a JSON list, not an object"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "shards"}), "no 'shards'"),
    (lambda text: json.dumps({**json.loads(text), "shards": {"train": [{"documents": 1}], "val": []}}),
     "a shard without its 'file' or 'tokens'"),
])
def test_a_damaged_manifest_is_named_and_kept(tokenizer, tmp_path, damage, what):
    out = prepared(tokenizer, tmp_path)
    manifest = out / prep.MANIFEST
    manifest.write_text(damage(manifest.read_text()))
    damaged = manifest.read_text()
    with pytest.raises(UserError) as error:  # as `forgather data prepare` and a streaming run read it
        prep.prepare([tmp_path / "a.jsonl"], tokenizer, out, num_workers=1, progress=False)
    line = reported(error.value)
    assert line.startswith(f"{manifest}: not the manifest that was prepared ({what}")
    assert f"prepare the corpus again, into a new directory or after deleting {out}" in line
    assert manifest.read_text() == damaged and (out / "train").is_dir()  # nothing of the user's is deleted


# ---- in-memory sources (data=jsonl, data=text_files) --------------------------------------------------


@pytest.mark.parametrize("make, what", [
    (lambda path: path.mkdir(), "a directory, not a jsonl file; check data_path"),
    (lambda path: None, "no such file; check data_path"),
])
def test_jsonl_source_that_is_no_file_is_named(tmp_path, make, what):
    make(tmp_path / "docs.jsonl")
    with pytest.raises(FileNotFoundError) as error:
        jsonl_documents(tmp_path / "docs.jsonl")
    assert reported(error.value) == f"{tmp_path / 'docs.jsonl'}: {what}"


def test_jsonl_line_that_is_not_text_is_named_by_its_number(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\xff\xfe binary\n')
    with pytest.raises(ValueError) as error:
        jsonl_documents(path)
    assert reported(error.value).startswith(f"{path}:2: not utf-8 text (invalid start byte at byte 0 of the line); fix")


def test_text_file_that_is_not_text_is_named(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError) as error:
        text_documents(tmp_path)
    assert reported(error.value).startswith(f"{tmp_path / 'a.txt'}: not utf-8 text (invalid start byte at byte 3)")


def test_text_directory_without_matching_files_is_named(tmp_path):
    (tmp_path / "notes.md").write_text("a note")
    with pytest.raises(FileNotFoundError) as error:
        text_documents(tmp_path)
    assert reported(error.value) == (f"{tmp_path}: no file in this directory matches '*.txt'; set the pattern "
                                     f"(data_pattern='*.md') or give other data_paths")


# ---- the datamodule: no training data, no validation data --------------------------------------------


def test_datamodule_with_no_documents_stops_instead_of_training_on_nothing(tokenizer):
    module = TextDataModule(tokenizer, documents=[], block_size=16, cache=False)
    with pytest.raises(UserError) as error:
        module.setup()
    assert "the data has no training documents" in reported(error.value)
    assert "check the data source (data_path, data_paths)" in reported(error.value)


def test_datamodule_without_validation_blocks_warns(tokenizer):
    module = TextDataModule(tokenizer, documents=TEXTS, block_size=16, val_fraction=0.0, cache=False)
    with pytest.warns(NoValidationWarning, match="no validation blocks .*the run reports no val/loss"):
        module.setup()
    assert len(module.train_dataset) > 0 and len(module.val_dataset) == 0


def test_streaming_without_validation_shards_warns(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    corpus = prep.PreparedCorpus(tmp_path / "out", [source], val_fraction=0.0, num_workers=1)
    module = TextDataModule(tokenizer, documents=corpus, block_size=16)
    with pytest.warns(NoValidationWarning):
        module.setup()
    assert len(module.train_dataset) > 0 and len(module.val_dataset) == 0
