"""Preparing under an audit's probes: one key names one set of shards whatever the workers; concurrent, killed
and disk-full prepares keep or share their work; refusals say what changed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgather.data import prepare as prep
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.errors import UserError
from helpers.kill import _children

TEXTS = [f"Document number {i} says {'hello ' * (i % 7)}and {'world ' * (i % 5)}then ends." for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def contents(out: Path) -> dict[str, str]:
    """Every file of a prepared directory, by its path there, as a hash of its bytes."""
    return {path.relative_to(out).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.rglob("*")) if path.is_file()}


def test_the_shards_are_byte_identical_whatever_the_number_of_workers(tokenizer, tmp_path):
    """A 5 MB corpus (under 256 MiB a worker) was cut into units by --workers: one key, two sets of shards."""
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS * 520)
    one = prep.prepare([source], tokenizer, tmp_path / "one", num_workers=1, progress=False)
    two = prep.prepare([source], tokenizer, tmp_path / "two", num_workers=2, progress=False)
    assert one["key"] == two["key"]
    assert len(one["shards"]["train"]) > 1
    assert contents(tmp_path / "one") == contents(tmp_path / "two")


def test_the_key_covers_the_unit_size(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    small = prep.prepare([source], tokenizer, tmp_path / "small", unit_bytes=700, num_workers=1, progress=False)
    with pytest.raises(UserError, match=f"{tmp_path / 'small'}: prepared from other sources, tokenizer or settings"):
        prep.prepare([source], tokenizer, tmp_path / "small", unit_bytes=4096, num_workers=1, progress=False)
    large = prep.prepare([source], tokenizer, tmp_path / "large", unit_bytes=4096, num_workers=1, progress=False)
    assert small["key"] != large["key"]


def test_a_directory_of_the_earlier_format_is_refused_saying_what_to_do(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    manifest = json.loads((tmp_path / "out" / prep.MANIFEST).read_text())
    (tmp_path / "out" / prep.MANIFEST).write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(UserError, match=rf"^{tmp_path / 'out'}: prepared by an earlier forgather \(format 1, now 2: "
                                        r"its shards may depend on the number of workers\); delete it and prepare again"):
        prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)


def prepare_in_a_child(tmp_path: Path, tokenizer, source: Path, out: Path, preamble: str = "",
                       **arguments) -> subprocess.Popen:
    """`prepare` in another process (what a second run, a sweep point or another node is), after `preamble`."""
    tokenizer.save_pretrained(tmp_path / "tok")
    code = (
        f"{preamble}from forgather.data.prepare import prepare; from forgather.data.tokenizer import load_tokenizer;"
        f"prepare([{str(source)!r}], load_tokenizer({str(tmp_path / 'tok')!r}), {str(out)!r}, progress=False,"
        f" **{arguments!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def wait_for(condition, child: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None and time.monotonic() < deadline, "the other prepare ended too soon"
        time.sleep(0.02)


def test_a_second_prepare_of_the_same_work_waits_for_the_first_and_uses_its_shards(tokenizer, tmp_path, capsys):
    """Two runs of a sweep preparing one corpus at once: the second was refused ('another process is preparing')."""
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS * 40)
    arguments = dict(num_workers=1, unit_bytes=4096, val_fraction=0.1)
    child = prepare_in_a_child(tmp_path, tokenizer, source, tmp_path / "out", **arguments)
    wait_for(lambda: any(tmp_path.glob(".out.*.tmp/units/*.json")), child)
    manifest = prep.prepare([source], tokenizer, tmp_path / "out", progress=False, **arguments)
    assert child.wait(60) == 0, child.stderr.read()
    assert "another process is preparing the same corpus into it; waiting for it to end" in capsys.readouterr().err
    assert manifest == {**prep.read_manifest(tmp_path / "out"), "path": str(tmp_path / "out")}
    assert contents(tmp_path / "out") == contents(Path(prep.prepare([source], tokenizer, tmp_path / "fresh",
                                                                    progress=False, **arguments)["path"]))
    assert not list(tmp_path.glob(".out.*.tmp"))


def continues_to_a_fresh_prepare(tmp_path, capsys, tokenizer, source, arguments, at_least: int) -> None:
    """The interrupted prepare into tmp_path/out kept at least `at_least` units; the next one continues from
    them to shards and a manifest equal to a fresh prepare's."""
    (staging,) = tmp_path.glob(".out.*.tmp")
    recorded = len(list(staging.glob("units/*.json")))
    assert recorded >= at_least
    capsys.readouterr()
    continued = prep.prepare([source], tokenizer, tmp_path / "out", progress=False, **arguments)
    assert f"continuing an interrupted prepare, {recorded} of" in capsys.readouterr().err
    fresh = prep.prepare([source], tokenizer, tmp_path / "fresh", progress=False, **arguments)
    assert contents(tmp_path / "out") == contents(tmp_path / "fresh")
    assert {k: v for k, v in continued.items() if k != "path"} == {k: v for k, v in fresh.items() if k != "path"}


def test_a_lost_worker_keeps_the_units_done_for_the_next_prepare(tokenizer, tmp_path, capsys):
    """The OOM killer taking one tokenizer process deleted the staging directory: every unit done was lost."""
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS * 40)
    arguments = dict(num_workers=2, unit_bytes=4096, val_fraction=0.1)
    child = prepare_in_a_child(tmp_path, tokenizer, source, tmp_path / "out", **arguments)
    wait_for(lambda: len(list(tmp_path.glob(".out.*.tmp/units/*.json"))) >= 3, child)
    (worker, *_) = [pid for pid in _children(child.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(worker, signal.SIGKILL)
    assert child.wait(60) == 1
    assert "a tokenizer process died (killed: out of memory?, or it failed to start" in child.stderr.read()
    continues_to_a_fresh_prepare(tmp_path, capsys, tokenizer, source, arguments, at_least=3)


def test_an_out_inside_the_source_glob_is_not_read_as_a_source(tokenizer, tmp_path):
    """`--source 'data/*' --out data/shards` prepared once; the same command again failed on data/shards."""
    (tmp_path / "data").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "data" / f"{i:03d}.txt").write_text(text)
    first = prep.prepare([tmp_path / "data" / "*"], tokenizer, tmp_path / "data" / "shards", num_workers=1, progress=False)
    again = prep.prepare([tmp_path / "data" / "*"], tokenizer, tmp_path / "data" / "shards", num_workers=1, progress=False)
    assert again == first and len(first["sources"]) == len(TEXTS)


def test_a_unit_past_the_shard_size_goes_to_several_shards_read_in_order(tokenizer, tmp_path, monkeypatch):
    """A unit was one shard whatever its size: a saved dataset's 100k rows of books overflowed the int32 offsets
    (written without an error, the shard then read back wrong) and were held in memory at once."""
    import datasets

    texts = [text * 20 for text in TEXTS[:60]]  # ~400 tokens each
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "books"))
    monkeypatch.setattr(prep, "SHARD_TOKENS", 5000)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    prep._init_worker(prep.tokenizer_json(tokenizer), os.getppid())  # in-process: the patched size applies
    (unit,) = prep.work_units([tmp_path / "books"])
    for split in prep.SPLITS:
        (tmp_path / "stage" / split).mkdir(parents=True)
    settings = {"seed": 0, "val_fraction": 0.0, "eos_id": tokenizer.eos_token_id, "dtype": "uint16"}
    result = prep._prepare_unit(unit, str(tmp_path / "stage"), "text", settings, "stop")
    shards = result.shards["train"]
    assert [shard["file"] for shard in shards[:3]] == ["train/00000.arrow", "train/00000-001.arrow", "train/00000-002.arrow"]
    assert all(5000 <= shard["tokens"] < 5000 + 1000 for shard in shards[:-1])
    manifest = prep._manifest("key", [tmp_path / "books"], settings, [result])
    assert manifest["shards"]["train"] == shards
    read = [doc for shard in shards for doc in datasets.Dataset.from_file(str(tmp_path / "stage" / shard["file"]))["input_ids"]]
    assert read == [[*ids, tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def test_a_prepare_that_loses_the_race_to_other_work_is_an_error_not_the_other_s_shards(tokenizer, tmp_path, monkeypatch):
    """Two prepares into one directory with other tokenizers: the second to finish returned its own manifest
    for the directory the first had filled, and a run then streamed the other tokenizer's ids."""
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    other = build_bpe_tokenizer(TEXTS, vocab_size=280)
    publish = prep.publish_directory

    def the_other_finishes_first(staging, path, finished):
        monkeypatch.setattr(prep, "publish_directory", publish)
        prep.prepare([source], other, path, num_workers=1, progress=False)
        publish(staging, path, finished)

    monkeypatch.setattr(prep, "publish_directory", the_other_finishes_first)
    with pytest.raises(UserError, match=f"{tmp_path / 'out'}: prepared from other sources, tokenizer or settings"):
        prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    assert prep.read_manifest(tmp_path / "out")["key"] == prep.prepare([source], other, tmp_path / "out", progress=False)["key"]
    assert not list(tmp_path.glob(".out.*.tmp"))


def test_a_corpus_whose_every_line_is_skipped_says_so(tokenizer, tmp_path):
    """--on-bad-line skip with the wrong --field skipped every line, then said 'empty files or fields'."""
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"body": text}) + "\n" for text in TEXTS[:5]))
    with pytest.raises(UserError, match=rf"^{source}: the corpus has no documents: every line was bad and skipped "
                                        rf"\(5; the first: {source}:1: no field 'text' in this record \(its fields: body\)\); "
                                        r"fix the lines or set --field$"):
        prep.prepare([source], tokenizer, tmp_path / "out", on_bad_line="skip", num_workers=1, progress=False)


def test_a_document_longer_than_a_shard_holds_is_named_by_file_and_line(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "MAX_DOCUMENT_TOKENS", 50)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    prep._init_worker(prep.tokenizer_json(tokenizer), os.getppid())
    (unit,) = prep.work_units([write_jsonl(tmp_path / "a.jsonl", [TEXTS[0], TEXTS[1] * 10])])
    settings = {"seed": 0, "val_fraction": 0.0, "eos_id": tokenizer.eos_token_id, "dtype": "uint16"}
    with pytest.raises(UserError, match=rf"^{tmp_path / 'a.jsonl'}:2: a document of [\d,]+ tokens, more than a shard "
                                        r"holds \(50\); split it into smaller documents$"):
        prep._prepare_unit(unit, str(tmp_path / "stage"), "text", settings, "stop")


def test_a_full_disk_keeps_the_units_done_for_the_next_prepare(tokenizer, tmp_path, capsys):
    """A shard that could not be written (a full disk, hours in) deleted every unit done. The disk fills here by
    a file size limit on the prepare's processes (RLIMIT_FSIZE: writing past it fails with EFBIG in Python)."""
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS * 20 + [" ".join(TEXTS) * 20])  # the last unit's shard is large
    arguments = dict(num_workers=1, unit_bytes=4096, val_fraction=0)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10));"
    child = prepare_in_a_child(tmp_path, tokenizer, source, tmp_path / "out", limit, **arguments)
    assert child.wait(120) == 1
    assert "could not write this shard (File too large); the units done are kept" in child.stderr.read()
    assert not (tmp_path / "out").exists()
    continues_to_a_fresh_prepare(tmp_path, capsys, tokenizer, source, arguments, at_least=10)


def test_a_refused_directory_names_what_changed(tokenizer, tmp_path):
    """'prepared from other sources, tokenizer or settings' left the user to guess which (a touched file?)."""
    source = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)
    with pytest.raises(UserError, match=r"settings \(val_fraction 0.02, now 0.1; key "):
        prep.prepare([source], tokenizer, tmp_path / "out", val_fraction=0.1, num_workers=1, progress=False)
    with pytest.raises(UserError, match=r"settings \(the tokenizer; key "):
        prep.prepare([source], build_bpe_tokenizer(TEXTS, vocab_size=280), tmp_path / "out", progress=False)
    os.utime(source, ns=(0, 0))  # touched: rsync without -t, a checkout
    with pytest.raises(UserError, match=rf"settings \({source} edited; key "):
        prep.prepare([source], tokenizer, tmp_path / "out", num_workers=1, progress=False)


def test_a_file_named_by_two_sources_is_an_error_not_read_twice(tokenizer, tmp_path):
    """Overlapping globs read a file twice: its documents trained on twice, and copies drawn into validation."""
    write_jsonl(tmp_path / "a.jsonl", TEXTS)
    write_jsonl(tmp_path / "extra.jsonl", TEXTS[:5])
    sources = [tmp_path / "*.jsonl", tmp_path / "extra.jsonl"]
    message = (f"{tmp_path / 'extra.jsonl'}: named by two sources ('{tmp_path / '*.jsonl'}' and "
               f"'{tmp_path / 'extra.jsonl'}'); each file is read once: narrow the globs")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        prep.prepare(sources, tokenizer, tmp_path / "out", num_workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_recursive_glob_takes_the_files_and_saved_datasets_below_not_the_folders(tmp_path):
    """`--source 'data/**'` matched data/ itself and stopped: a directory, not a saved dataset."""
    from datasets import Dataset

    data = tmp_path / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    top = write_jsonl(data / "a.jsonl", ["one"])
    deep = write_jsonl(data / "sub" / "deeper" / "b.jsonl", ["two"])
    saved = data / "sub" / "saved"
    Dataset.from_dict({"text": ["three"]}).save_to_disk(str(saved))
    assert prep.source_files([f"{data}/**"]) == [top, deep, saved]  # sorted by path
    with pytest.raises(UserError, match=r"sub: a directory, not a dataset saved with save_to_disk"):
        prep.source_files([data / "sub"])  # named itself, a plain directory is still a mistake


@pytest.mark.parametrize("name", ["c4-train.00000.json.gz", "corpus.jsonl.zst"])
def test_a_compressed_source_says_to_decompress_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match=rf"{name}: a compressed file, which prepare does not read .* decompress it"):
        prep.source_files([tmp_path / name])
