"""`forgather data prepare` of an experiment: the shards its run would prepare, made beforehand."""

from __future__ import annotations

import json
import os

import pytest

from forgather.cli.main import main
from test_data_stream import PROJECT, losses, run_streaming


def prepare(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["-p", PROJECT, "data", "prepare", *arguments])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_experiment_s_shards_are_the_ones_its_run_uses(tmp_path, capsys):
    shards = tmp_path / "shards"
    code, out, err = prepare(capsys, "+experiment=micro", "data=streaming", f"data_path={shards}")
    assert code == 0, err
    assert f"\n{shards}: train: " in out  # after the progress bar
    manifest = shards / "manifest.json"
    written = manifest.stat().st_mtime_ns
    # The run finds them ready: same key (its tokenizer and settings), so nothing is prepared again.
    done = run_streaming(tmp_path, f"data_path={shards}", "max_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert manifest.stat().st_mtime_ns == written and sorted(losses(tmp_path)) == [0, 1]


def test_an_experiment_that_does_not_stream_is_a_one_line_error(capsys):
    code, _, err = prepare(capsys, "+experiment=micro")
    assert code == 2 and err.count("\n") == 1 and "add data=streaming" in err


@pytest.mark.parametrize("flag", [["--tokenizer", "tok"], ["--out", "somewhere"], ["--source", "a.jsonl"]])
def test_corpus_flags_with_an_experiment_are_refused(capsys, flag):
    code, _, err = prepare(capsys, "+experiment=micro", "data=streaming", *flag)
    assert code == 2 and flag[0] in err and "data_sources" in err


def test_neither_a_corpus_nor_an_experiment_says_what_to_give(capsys):
    code, _, err = prepare(capsys)
    assert code == 2 and "--tokenizer and --out" in err and "+experiment=NAME" in err
