"""Loaders for the user's own documents: text files, jsonl, Hugging Face datasets saved on disk."""

import json
import sys

import pytest

from forgather.data import sources


@pytest.fixture
def text_dir(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("First file.\n\nSecond paragraph\nspans two lines.\n")
    (tmp_path / "b" / "c.txt").write_text("Nested file.\r\n\r\n  \r\n\r\nAfter blank lines.\r\n")
    (tmp_path / "b" / "empty.txt").write_text("\n\n")
    (tmp_path / "notes.md").write_text("Not a text file by pattern.")
    return tmp_path


def test_text_directory_gives_one_document_per_file_in_path_order(text_dir):
    assert sources.text_documents(text_dir) == [
        "First file.\n\nSecond paragraph\nspans two lines.\n",
        "Nested file.\n\n  \n\nAfter blank lines.\n",
    ]


def test_text_paragraph_split_cuts_on_blank_lines(text_dir):
    assert sources.text_documents(text_dir, split="paragraph") == [
        "First file.",
        "Second paragraph\nspans two lines.",
        "Nested file.",
        "After blank lines.",
    ]


def test_text_files_and_pattern_can_be_given(text_dir):
    assert sources.text_documents([text_dir / "notes.md"]) == ["Not a text file by pattern."]
    assert sources.text_documents(text_dir, pattern="*.md") == ["Not a text file by pattern."]


def test_missing_text_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.text_documents(tmp_path / "nowhere")


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "one", "id": 1}, {"text": "", "id": 2}, {"body": "x", "text": "three"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert sources.jsonl_documents(path) == ["one", "three"]


def test_jsonl_field_is_configurable_and_missing_field_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(KeyError, match=r"docs.jsonl:2: no field 'body' in this record \(its fields: text\); "
                                       r"set field= \(data_field= on the command line\)"):
        sources.jsonl_documents(path, field="body")


def test_a_line_that_is_not_json_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + "{'text': 'single quotes'}\n")
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not valid JSON \(Expecting property name enclosed in "
                                         r"double quotes at column 2\); each line of a jsonl file holds one JSON object"):
        sources.jsonl_documents(path)


@pytest.mark.parametrize(("line", "error", "message"), [
    ({"text": 5}, KeyError, r"docs.jsonl:2: field 'text' is not text but int 5; set field="),
    (["a list"], ValueError, r"docs.jsonl:2: not a JSON object but a list"),
])
def test_a_record_without_text_in_its_field_is_named_by_file_and_line(tmp_path, line, error, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(error, match=message):
        sources.jsonl_documents(path)


def test_both_jsonl_readers_word_a_bad_line_alike(tmp_path):
    from forgather.data import prepare

    assert prepare.record_text is sources.record_text  # one reader of a record, for the loader and prepare
    assert sources.record_text(b'{"text": "x"}', "text") == ("x", None)
    assert sources.record_text(b'{"text": "\xc3\x28"}', "text")[1].startswith("not UTF-8 text")


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "flat")
    assert sources.hf_documents(tmp_path / "flat") == ["alpha", "beta"]


def test_hf_dataset_dict_picks_split_and_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {
        "train": datasets.Dataset.from_dict({"body": ["t1", "t2"]}),
        "validation": datasets.Dataset.from_dict({"body": ["v1"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")
    assert sources.hf_documents(tmp_path / "dict", column="body") == ["t1", "t2"]
    assert sources.hf_documents(tmp_path / "dict", column="body", split="validation") == ["v1"]
    with pytest.raises(KeyError, match="no column 'text'"):
        sources.hf_documents(tmp_path / "dict")


def test_hf_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        sources.hf_documents(tmp_path)


def test_documents_source_may_be_a_callable():
    assert list(sources.resolve_documents(lambda: iter(["x", "y"]))) == ["x", "y"]
    assert sources.resolve_documents(["z"]) == ["z"]


def test_a_saved_dataset_path_of_the_wrong_kind_says_what_data_path_needs(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "plain").mkdir()
    (tmp_path / "a.txt").write_text("text")
    for path, what in [("missing", "no such directory; check data_path"),
                       ("a.txt", "a file, not a directory saved with save_to_disk; check data_path"),
                       ("plain", "not a dataset saved with save_to_disk; give data_path a directory written by "
                                 "Dataset.save_to_disk, or read files with data=jsonl or data=text_files")]:
        with pytest.raises(FileNotFoundError) as caught:
            sources.hf_documents(tmp_path / path)
        assert str(caught.value) == f"{tmp_path / path}: {what}"


def test_a_saved_dataset_column_or_split_that_holds_no_text_names_the_value_to_set(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a"], "n": [1]}).save_to_disk(tmp_path / "flat")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(tmp_path / "dict")
    with pytest.raises(KeyError) as caught:
        sources.hf_documents(tmp_path / "flat", column="n")
    assert caught.value.args[0] == (f"{tmp_path / 'flat'}: column 'n' holds int64, not text; set column= "
                                    f"(data_column= on the command line) to a text column")
    with pytest.raises(KeyError) as caught:
        sources.hf_documents(tmp_path / "dict")
    assert caught.value.args[0] == (f"{tmp_path / 'dict'}: no 'train' split in this DatasetDict; set split= "
                                    f"(data_split= on the command line) to one of ['validation']")
