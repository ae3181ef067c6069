"""Preparing corpora into token shards: every document once with eos, parallel, keyed, atomic, bad input named."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgather.data import prepare as prep
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.errors import UserError
from helpers.kill import alive, kill_when

TEXTS = [f"Document number {i} says {'hello ' * (i % 7)}and {'world ' * (i % 5)}then ends." for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def shard_documents(out: Path, split: str) -> list[list[int]]:
    from datasets import Dataset

    manifest = prep.read_manifest(out)
    return [doc for shard in manifest["shards"][split] for doc in Dataset.from_file(str(out / shard["file"]))["input_ids"]]


def encoded(tokenizer, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [[*doc, tokenizer.eos_token_id] for doc in ids]


def test_every_document_lands_once_with_eos_in_order_over_parallel_units(tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", TEXTS[:70])
    write_jsonl(tmp_path / "b.jsonl", TEXTS[70:])
    # 1 KiB units: each file is cut into several line-aligned byte ranges, tokenized by two processes.
    manifest = prep.prepare([str(tmp_path / "*.jsonl")], tokenizer, tmp_path / "out", num_workers=2,
                            val_fraction=0.2, unit_bytes=1024, progress=False)
    assert manifest["sources"] == [str(first), str(tmp_path / "b.jsonl")]
    assert len(manifest["shards"]["train"]) > 2
    train, val = shard_documents(tmp_path / "out", "train"), shard_documents(tmp_path / "out", "val")
    expected = encoded(tokenizer, TEXTS)
    assert sorted(train + val) == sorted(expected)
    assert 10 <= len(val) <= 40
    assert train == [doc for doc in expected if doc in train], "the train split keeps the corpus order"


def test_the_split_does_not_depend_on_the_units_or_the_number_of_workers(tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS)
    one = prep.prepare([tmp_path / "a.jsonl"], tokenizer, tmp_path / "one", num_workers=1, unit_bytes=4096,
                       val_fraction=0.2, progress=False)
    two = prep.prepare([tmp_path / "a.jsonl"], tokenizer, tmp_path / "two", num_workers=2, unit_bytes=700,
                       val_fraction=0.2, progress=False)
    assert len(one["shards"]["train"]) < len(two["shards"]["train"])
    for split in prep.SPLITS:
        assert shard_documents(tmp_path / "one", split) == shard_documents(tmp_path / "two", split)


def test_text_parquet_and_saved_dataset_sources(tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text(TEXTS[0])
    (tmp_path / "t" / "two.md").write_text(TEXTS[1])
    pq.write_table(pa.table({"body": TEXTS[2:6]}), tmp_path / "p.parquet", row_group_size=2)
    datasets.Dataset.from_dict({"body": TEXTS[6:9]}).save_to_disk(str(tmp_path / "saved"))
    text_manifest = prep.prepare([tmp_path / "t" / "*"], tokenizer, tmp_path / "o1", val_fraction=0, progress=False)
    other = prep.prepare([tmp_path / "p.parquet", tmp_path / "saved"], tokenizer, tmp_path / "o2", field="body",
                         val_fraction=0, progress=False)
    assert shard_documents(tmp_path / "o1", "train") == encoded(tokenizer, TEXTS[:2])
    assert shard_documents(tmp_path / "o2", "train") == encoded(tokenizer, TEXTS[2:9])
    assert len(other["shards"]["train"]) == 3, "one unit a parquet row group, one for the small saved dataset"
    assert text_manifest["shards"]["val"] == []


def test_a_prepared_directory_is_reused_and_a_changed_tokenizer_is_refused(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    prep.prepare([source], tokenizer, tmp_path / "out", progress=False)
    stamp = (tmp_path / "out" / prep.MANIFEST).stat().st_mtime_ns
    prep.prepare([source], tokenizer, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / prep.MANIFEST).stat().st_mtime_ns == stamp
    other = build_bpe_tokenizer(TEXTS, vocab_size=280)
    with pytest.raises(UserError, match=f"{tmp_path / 'out'}: prepared from other sources, tokenizer or settings"):
        prep.prepare([source], other, tmp_path / "out", progress=False)


def test_an_out_holding_other_files_is_refused_and_an_empty_one_is_filled(tokenizer, tmp_path, capsys):
    """`--out` over a directory of other files said to run `forgather data prepare --out DIR`, the command just run."""
    from forgather.cli.main import main

    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    tokenizer.save_pretrained(tmp_path / "tok")
    argv = ["data", "prepare", "--source", str(source), "--tokenizer", str(tmp_path / "tok"), "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path / "mine")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'mine'}: a directory of other files, not a prepared "
                                       f"directory (no {prep.MANIFEST}); give a new or empty directory to prepare into\n")
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    prep.prepare([source], tokenizer, tmp_path / "empty", num_workers=1, progress=False)
    assert (tmp_path / "empty" / prep.MANIFEST).is_file()


def test_without_a_directory_the_shards_go_under_the_cache_named_by_the_key(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGATHER_CACHE_DIR", str(tmp_path / "cache"))
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    first = prep.prepare([source], tokenizer, None, progress=False)
    second = prep.prepare([source], build_bpe_tokenizer(TEXTS, vocab_size=280), None, progress=False)
    assert Path(first["path"]).parent == tmp_path / "cache" / "prepared"
    assert first["path"] != second["path"] and first["key"] != second["key"]


def test_a_malformed_line_is_named_by_file_and_line_or_skipped_and_counted(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS[:30])
    lines = source.read_text().splitlines()
    lines[20] = '{"text": "cut off'
    lines[25] = '{"title": "no text field"}'
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"{source}:21: not valid JSON .*--on-bad-line skip"):
        prep.prepare([source], tokenizer, tmp_path / "out", unit_bytes=512, num_workers=2, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"], "no staging directory is left behind"
    manifest = prep.prepare([source], tokenizer, tmp_path / "out", on_bad_line="skip", val_fraction=0, progress=False)
    assert manifest["skipped_lines"] == 2
    assert manifest["first_skipped"].startswith(f"{source}:21: not valid JSON")
    assert len(shard_documents(tmp_path / "out", "train")) == 28


def test_a_lone_surrogate_is_a_bad_line_named_or_skipped_like_the_others(tokenizer, tmp_path):
    # Before: valid JSON, so the line was taken, and the tokenizer failed on it without naming it
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS[:10])
    lines = source.read_text().splitlines()
    lines[4] = '{"text": "half a pair \\ud800 here"}'
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{source}:5: a lone surrogate '\\ud800' at character 12 of field 'text', "
                                        rf"which is no text .*; fix the line, or skip bad lines"):
        prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    manifest = prep.prepare([source], tokenizer, tmp_path / "out", on_bad_line="skip", val_fraction=0, progress=False)
    assert manifest["skipped_lines"] == 1 and len(shard_documents(tmp_path / "out", "train")) == 9


def test_the_bad_line_reported_is_the_earliest_units_whichever_worker_finds_one_first(monkeypatch):
    """Units run in parallel: the second unit's bad line may be found before the first unit's (it was, by
    timing, in a CI run). The error reported is the first unit's. Workers are threads here, so that the
    second unit can be made to fail first."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    def prepare_unit(unit, staging, field, settings, on_bad_line):
        if unit == 0:
            time.sleep(0.5)
        raise UserError(f"a.jsonl:{unit * 10 + 3}: not valid JSON")

    monkeypatch.setattr(prep, "_prepare_unit", prepare_unit)
    monkeypatch.setattr(prep, "ProcessPoolExecutor", lambda workers, **_: ThreadPoolExecutor(workers))
    with pytest.raises(UserError, match=r"a.jsonl:3: not valid JSON"):
        prep._run_units([0, 1, 2], "staging", "", "text", {}, "stop", 3, progress=False)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing*.jsonl", "missing\\*.jsonl: no file matches this source"),
        (lambda d: write_jsonl(d / "a.jsonl", TEXTS[:3], field="body"), r"a.jsonl:1: no field 'text' in this record \(its fields: body, id\); set --field to the text's key"),
        (lambda d: write_jsonl(d / "a.jsonl", ["", "  "]), r"a.jsonl: the corpus has no documents"),
        (lambda d: (d / "a.csv").write_text("x") and d / "a.csv", r"a.csv: unknown kind of source"),
    ],
)
def test_bad_sources_are_errors_naming_the_file(tokenizer, tmp_path, setup, message):
    with pytest.raises(UserError if "matches" not in message else FileNotFoundError, match=message):
        prep.prepare([setup(tmp_path)], tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_file_is_named(tokenizer, tmp_path):
    # A dangling link: globs list it, opening it fails (as a file without read permission does, for non-root).
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    with pytest.raises(UserError, match=f"{tmp_path / 'gone.jsonl'}: not readable \\(No such file or directory\\)"):
        prep.prepare([tmp_path / "*.jsonl"], tokenizer, tmp_path / "out", progress=False)


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UserError, match="the tokenizer has no eos token"):
        prep.prepare([write_jsonl(tmp_path / "a.jsonl", TEXTS)], bare, tmp_path / "out", progress=False)


def test_a_full_disk_names_the_shard_being_written(tokenizer, tmp_path, monkeypatch):
    from datasets import arrow_writer

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(arrow_writer.ArrowWriter, "write_table", full)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    prep._init_worker(prep.tokenizer_json(tokenizer), os.getppid())  # the parent it watches: this test's, alive
    unit = prep.work_units([write_jsonl(tmp_path / "a.jsonl", TEXTS)])[0]
    (tmp_path / "stage" / "train").mkdir(parents=True)
    (tmp_path / "stage" / "val").mkdir()
    settings = {"seed": 0, "val_fraction": 0.0, "eos_id": tokenizer.eos_token_id, "dtype": "uint16"}
    with pytest.raises(UserError, match=r"stage/train/00000.arrow: could not write this shard \(No space left"):
        prep._prepare_unit(unit, str(tmp_path / "stage"), "text", settings, "stop")


def test_a_killed_prepare_leaves_nothing_that_looks_complete_and_the_next_one_clears_its_staging(tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 400)
    tokenizer.save_pretrained(tmp_path / "tok")
    code = (
        "import sys; from forgather.data.prepare import prepare; from forgather.data.tokenizer import load_tokenizer;"
        f"prepare([{str(tmp_path / 'a.jsonl')!r}], load_tokenizer({str(tmp_path / 'tok')!r}), {str(tmp_path / 'out')!r},"
        " num_workers=1, unit_bytes=4096, progress=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    workers = kill_when(child, lambda: any(tmp_path.glob(".out.*.tmp/train/*.arrow")), 60, "prepare ended before writing a shard")
    assert workers and alive(workers, within=10) == []  # they end with it, not wait on their queue forever
    assert not (tmp_path / "out").exists()
    from forgather.data.stream import PackedShards

    with pytest.raises(UserError, match="not a prepared directory"):
        PackedShards(tmp_path / "out", "train", 16)
    (abandoned,) = tmp_path.glob(".out.*.tmp")
    live = tmp_path / ".out.live.tmp"  # another prepare of the same directory, still writing
    live.mkdir()
    with open(live / prep.WRITER_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prep.prepare([tmp_path / "a.jsonl"], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    assert (tmp_path / "out" / prep.MANIFEST).is_file()
    assert not abandoned.exists() and live.is_dir()


def test_a_killed_prepare_is_continued_by_the_next_one_of_the_same_work(tokenizer, tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 400)
    tokenizer.save_pretrained(tmp_path / "tok")
    arguments = dict(num_workers=1, unit_bytes=4096, val_fraction=0.1, progress=False)
    code = (
        "import sys; from forgather.data.prepare import prepare; from forgather.data.tokenizer import load_tokenizer;"
        f"prepare([{str(tmp_path / 'a.jsonl')!r}], load_tokenizer({str(tmp_path / 'tok')!r}), {str(tmp_path / 'out')!r},"
        f" **{arguments!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    workers = kill_when(child, lambda: len(list(tmp_path.glob(".out.*.tmp/units/*.json"))) >= 3, 60, "prepare ended before three units")
    assert workers and alive(workers, within=10) == []  # they end with it, not wait on their queue forever
    assert not (tmp_path / "out").exists()
    (staging,) = tmp_path.glob(".out.*.tmp")
    recorded = len(list(staging.glob("units/*.json")))
    capsys.readouterr()
    continued = prep.prepare([tmp_path / "a.jsonl"], tokenizer, tmp_path / "out", **arguments)
    done, total = capsys.readouterr().err.split("continuing an interrupted prepare, ")[1].split(" units done")[0].split(" of ")
    assert int(done) >= recorded >= 3 and int(total) == len(continued["shards"]["train"]) > int(done)
    fresh = prep.prepare([tmp_path / "a.jsonl"], tokenizer, tmp_path / "fresh", **arguments)
    assert {k: v for k, v in continued.items() if k != "path"} == {k: v for k, v in fresh.items() if k != "path"}
    for split in ("train", "val"):
        assert shard_documents(tmp_path / "out", split) == shard_documents(tmp_path / "fresh", split)
    assert not list(tmp_path.glob(".out.*.tmp")) and not (tmp_path / "out" / "units").exists()


def test_the_cli_prepares_and_reports_a_bad_line_in_one_line(tokenizer, tmp_path, capsys):
    from forgather.cli.main import main

    tokenizer.save_pretrained(tmp_path / "tok")
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    argv = ["data", "prepare", "--source", str(source), "--tokenizer", str(tmp_path / "tok"), "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert f"{tmp_path / 'out'}: train: 1 shards" in capsys.readouterr().out
    assert shard_documents(tmp_path / "out", "train") + shard_documents(tmp_path / "out", "val") != []
    source.write_text(source.read_text() + "not json\n")
    assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {source}:121: not valid JSON")
