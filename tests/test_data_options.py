"""The data group's file options from the command line: `data=jsonl data_path=FILE`, `data=text_files
data_paths=...`, `data=hf_disk data_path=DIR` take their paths as config values (they were template variables,
which no command line could set), and a missing path is a one-line error saying what to write."""

from __future__ import annotations

import json
import os

import pytest

from forgather.run import main

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
WORDS = "the quick brown fox jumps over the lazy dog while a second sentence says something else entirely"


def run(tmp_path, capsys, *arguments: str) -> tuple[int, str]:
    code = main(["-p", PROJECT, "--outputs", str(tmp_path / "out"), "+experiment=micro", *arguments])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("option, key", [("jsonl", "data_path"), ("text_files", "data_paths"), ("hf_disk", "data_path")])
def test_a_file_option_without_its_path_says_which_value_to_set(tmp_path, capsys, option, key):
    code, err = run(tmp_path, capsys, f"data={option}", "max_steps=1")
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert f"no value given for '{key}': set it on the command line ({key}=...)" in line


def test_jsonl_and_text_files_train_on_the_files_the_command_line_names(tmp_path, capsys):
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"body": f"{WORDS} {i}"}) + "\n" for i in range(8)))
    code, err = run(tmp_path, capsys, "data=jsonl", f"data_path={lines}", "data_field=body", "max_steps=1")
    assert code == 0, err
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(4):
        (texts / f"{i}.txt").write_text(f"{WORDS} {i}\n")
    (texts / "skipped.md").write_text("not a .txt file")
    code, err = run(tmp_path, capsys, "data=text_files", f"data_paths=[{texts},{lines}]", "max_steps=1")
    assert code == 0, err


def test_the_path_reaches_the_documents_source(tmp_path, capsys):
    assert main(["-p", PROJECT, "+experiment=micro", "data=text_files", "data_paths=[a,b]", "data_split=paragraph",
                 "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "data_paths:\n- a\n- b\n" in out and "data_split: paragraph" in out and "data_pattern: '*.txt'" in out


def test_a_pretrained_tokenizer_is_a_command_line_path_and_a_bad_one_is_one_line(tmp_path, capsys):
    from forgather.data.tokenizer import build_bpe_tokenizer, load_tokenizer

    saved = tmp_path / "tok"
    build_bpe_tokenizer([WORDS] * 8, vocab_size=300).save_pretrained(saved)
    code, err = run(tmp_path, capsys, "tokenizer=pretrained", f"tokenizer_path={saved}", "max_steps=1")
    assert code == 0, err
    code, err = run(tmp_path, capsys, "tokenizer=pretrained", f"tokenizer_path={tmp_path / 'nothing'}", "max_steps=1")
    assert code == 2 and f"tokenizer {tmp_path / 'nothing'}: no such file or directory" in err
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json or tokenizer_config.json"):
        load_tokenizer(tmp_path)  # a directory, but not a tokenizer's


def test_drop_last_is_a_config_value_that_reaches_the_datamodule(tmp_path, capsys):
    assert main(["-p", PROJECT, "+experiment=micro", "--cfg"]) == 0
    assert "drop_last: false" in capsys.readouterr().out
    assert main(["-p", PROJECT, "+experiment=micro", "drop_last=true", "--cfg"]) == 0
    assert "drop_last: true" in capsys.readouterr().out
    code, err = run(tmp_path, capsys, "drop_last=true", "max_steps=1")
    assert code == 0, err
