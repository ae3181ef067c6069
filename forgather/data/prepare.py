"""Prepare a corpus into token shards: source files -> tokenizer in worker processes -> Arrow shards on disk.

Storage is Hugging Face `datasets`' Arrow format: each shard is one Arrow file written with
`datasets.arrow_writer.ArrowWriter` whose rows are documents (column `input_ids`, token ids with eos
appended), read back memory-mapped with `datasets.Dataset.from_file` (see `forgather.data.stream`), so RAM
does not grow with the corpus. Chosen by measurement (docs/data.md): `datasets` installs beside the pinned
CPU torch (it does not depend on torch), while litdata requires torchvision (pip then replaces the CPU torch
with a CUDA build, or backtracks without end under constraints.txt) and mosaicml-streaming replaces torch and
downgrades transformers, tokenizers and numpy. On 9.3M tokens on the 2-core box, writing token shards ran at
26M tokens/s with `datasets` against 1.4M with `litdata.optimize`; both read blocks far above 10M tokens/s.

A prepared directory DIR holds `manifest.json` and `train/NNNNN.arrow`, `val/NNNNN.arrow` (one file per
work unit and split, `NNNNN-001.arrow` ... past `SHARD_TOKENS`; a unit without validation documents has no val
file). The manifest records the key, a hash of (format, the sources' paths, sizes and mtimes, the tokenizer's
serialized form, every setting, the unit size among them), so a changed tokenizer or source never reuses stale
shards: `prepare` on an existing DIR with another key is an error naming both. The key fixes the shards byte
for byte: the units follow from the sources and the unit size, which follows from the corpus's size, never
from the number of workers. DIR is built in a hidden staging sibling, `.DIR.<key>.tmp`, and renamed into place
after the manifest is written: a killed prepare never leaves a DIR that looks complete.
A prepare that stops early (killed, Ctrl-C, a lost node or worker) loses only the units it was tokenizing:
each unit finished is recorded in the staging directory (`units/NNNNN.json`, after its shards), and the next
prepare of the same corpus into the same DIR continues from there, with any number of workers; a staging
directory of other sources or settings is deleted once its writer's lock is gone (a full disk keeps the units
done); an error in the input (a bad line) deletes the staging directory. A second prepare of the same work into one DIR while
one runs waits for it and returns its result; one of other work that finishes second is refused by the key.

Sources (globs, sorted): `.jsonl`/`.json` (one JSON object a line, the text in `field`), `.txt`/`.md` (one
document a file), `.parquet` (column `field`), and directories saved with `datasets`' `save_to_disk`.
Work units: byte ranges of a jsonl file aligned to lines (64 MiB; a corpus under 4 GiB of jsonl is cut into
64, of at least 1 MiB), a text file, a parquet row group, 100k rows of a saved dataset. Units are tokenized in
`num_workers` spawned processes with the `tokenizers` library's `encode_batch` (special-token strings inside
a text are encoded as plain text, as the in-memory path does). A document goes to validation when a hash of
(seed, file index, its position in the file) falls under `val_fraction`: the split does not depend on the
units or the number of workers. Empty documents and blank lines are skipped. Bad input is a `UserError`
naming the file (and line for jsonl): a missing or unreadable file, a malformed jsonl line or one without
`field` (`on_bad_line="skip"` skips such lines and reports how many), an empty corpus, a tokenizer without
eos, a full disk. Torch-free.
"""

from __future__ import annotations

import fcntl
import glob
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from forgather.data.cache import atomic_write, cache_dir, fingerprint, publish_directory
from forgather.data.sources import record_text
from forgather.errors import UserError

# Bump when the shard layout, the units or the split rule change, so stale prepared directories are not reused.
# Format 1 cut a corpus under 256 MiB a worker into units by the number of workers: one key, several layouts.
PREPARED_FORMAT = 2
MANIFEST = "manifest.json"
WRITER_LOCK = ".writer"
UNITS_DIR = "units"  # in a staging directory: one record per finished unit
SPLITS = ("train", "val")
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md")
UNIT_BYTES = 64 << 20
UNITS_PER_CORPUS = 64  # a jsonl corpus under 4 GiB is cut into this many units (of at least 1 MiB)
HF_UNIT_ROWS = 100_000
ENCODE_BATCH = 512
# A unit's documents go to a further shard past this many tokens (512 MiB of uint16): a worker holds at most one
# shard's tokens, and a shard's int32 offsets never overflow (a saved dataset's 100k rows of books would).
SHARD_TOKENS = 1 << 28
MAX_DOCUMENT_TOKENS = (1 << 31) - 1 - SHARD_TOKENS
BadLine = Literal["stop", "skip"]


@dataclass(frozen=True)
class Unit:
    """One piece of work: a byte range of a jsonl file, a text file, a parquet row group, rows of a dataset."""

    index: int
    kind: str  # jsonl | text | parquet | hf
    path: str
    file_index: int
    start: int = 0
    end: int = 0


@dataclass
class UnitResult:
    index: int
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: int = 0
    first_skipped: str = ""
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {split: [] for split in SPLITS})


# ---- sources ------------------------------------------------------------------------------------------


def source_files(sources: Sequence[str | Path], out: Path | None = None) -> list[Path]:
    """The files (and saved-dataset directories) the source globs name, each glob sorted; one that matches
    nothing, a file that cannot be opened or of an unknown kind, is an error. The prepared directory `out` and
    what it holds are left out: a glob over the corpus's folder takes it in once it is written there."""
    files: list[Path] = []
    matched_by: dict[Path, str] = {}
    for source in sources:
        matches = sorted(glob.glob(os.path.expanduser(str(source)), recursive=True))
        if out is not None:
            matches = [match for match in matches if not _within(Path(match), out)]
        if glob.has_magic(os.path.expanduser(str(source))):
            # `data/**` matches data/ itself, its subdirectories and a saved dataset's own files: a glob takes the
            # files and the saved datasets it reaches, not the folders it walks through.
            datasets = [Path(match) for match in matches if Path(match).is_dir() and _is_saved_dataset(Path(match))]
            matches = [match for match in matches
                       if (not Path(match).is_dir() or Path(match) in datasets)
                       and not any(_within(Path(match), d) and Path(match) != d for d in datasets)]
        if not matches:
            raise FileNotFoundError(f"{source}: no file matches this source; check the path or glob")
        for match in map(Path, matches):
            # A file read twice would train twice on its documents, and put copies of them in validation too.
            if (first := matched_by.get(match.resolve())) is not None:
                raise UserError(f"{match}: named by two sources ({first!r} and {str(source)!r}); each file is read "
                                f"once: narrow the globs")
            matched_by[match.resolve()] = str(source)
            files.append(match)
    for path in files:
        _check_readable(path)
        source_kind(path)  # before anything reads it: a plain directory has no sizes to key it by
    return files


def _within(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def source_kind(path: Path) -> str:
    if path.is_dir():
        if _is_saved_dataset(path):
            return "hf"
        raise UserError(f"{path}: a directory, not a dataset saved with save_to_disk; give a glob of its files")
    suffix = path.suffix.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES), ("parquet", (".parquet",))):
        if suffix in suffixes:
            return kind
    if suffix in (".gz", ".zst", ".bz2", ".xz", ".zip"):  # corpora often ship compressed (c4's .json.gz)
        raise UserError(f"{path}: a compressed file, which prepare does not read (its work units are byte ranges of "
                        f"a file); decompress it first (e.g. gunzip -k, zstd -d), then give the .jsonl or .txt")
    raise UserError(f"{path}: unknown kind of source; use .jsonl, .txt/.md, .parquet or a saved dataset")


def work_units(files: Sequence[Path], field: str = "text", unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    units: list[Unit] = []
    for file_index, path in enumerate(files):
        kind = source_kind(path)
        if kind == "jsonl":
            size = path.stat().st_size
            ranges = [(start, min(start + unit_bytes, size)) for start in range(0, size, unit_bytes)]
        elif kind == "text":
            ranges = [(0, 0)]
        elif kind == "parquet":
            ranges = [(group, group + 1) for group in range(_parquet_row_groups(path))]
        else:
            rows = len(_hf_dataset(path, field))
            ranges = [(start, min(start + HF_UNIT_ROWS, rows)) for start in range(0, rows, HF_UNIT_ROWS)]
        first = len(units)
        units += [Unit(first + i, kind, str(path), file_index, *r) for i, r in enumerate(ranges)]
    return units


def _check_readable(path: Path) -> None:
    if path.is_dir():
        return
    try:
        path.open("rb").close()
    except OSError as error:
        raise UserError(f"{path}: not readable ({error.strerror}); fix the path or its permissions") from error


def _parquet_row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).num_row_groups
    except Exception as error:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({error})") from error


def require_datasets():
    """The Hugging Face `datasets` module (the shards' format), or an error saying how to install it."""
    try:
        import datasets
        import datasets.arrow_writer
    except ImportError as error:
        raise UserError("prepared shards (data=streaming) need `datasets`: pip install 'forgather[hf]'") from error
    return datasets


def _hf_dataset(path: Path, field: str):
    datasets = require_datasets()
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (it has {sorted(dataset)})")
        dataset = dataset["train"]
    if field not in dataset.column_names:
        raise UserError(f"{path}: no column {field!r}; columns are {dataset.column_names}; set the field")
    return dataset


def unit_texts(unit: Unit, field: str, on_bad_line: BadLine, result: UnitResult) -> Iterator[tuple[int, str]]:
    """(position in its file, text) of the non-empty documents of one unit, in order. The position (byte
    offset of a jsonl line, row of a parquet file or dataset, 0 for a text file) identifies the document
    whatever the unit boundaries are."""
    path = Path(unit.path)
    if unit.kind == "jsonl":
        texts: Iterable[tuple[int, str | None]] = _jsonl_texts(unit, field, on_bad_line, result)
    elif unit.kind == "text":
        try:
            texts = [(0, path.read_bytes().decode("utf-8"))]
        except UnicodeDecodeError as error:
            raise UserError(f"{path}: not UTF-8 text (byte {error.start}); convert it to UTF-8") from error
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise UserError(f"{path}: no column {field!r}; columns are {parquet.schema_arrow.names}; set the field")
        first = sum(parquet.metadata.row_group(group).num_rows for group in range(unit.start))
        # The text column alone, a batch at a time: a row group may be large, and hold other wide columns.
        batches = parquet.iter_batches(ENCODE_BATCH, row_groups=[unit.start], columns=[field])
        texts = enumerate((text for batch in batches for text in batch.column(0).to_pylist()), start=first)
    else:
        dataset = _hf_dataset(path, field)
        texts = ((row, text) for start in range(unit.start, unit.end, ENCODE_BATCH)
                 for row, text in enumerate(dataset[start : min(start + ENCODE_BATCH, unit.end)][field], start=start))
    return ((position, text) for position, text in texts if _is_document(text, path, position, field))


def _is_document(value: Any, path: Path, row: int, field: str) -> bool:
    """Whether `value` is a document (text, not blank); a value of another kind (a parquet or dataset column of
    numbers) is an error naming its row."""
    if value is not None and not isinstance(value, str):
        raise UserError(f"{path}: row {row}: column {field!r} holds {type(value).__name__} {value!r:.40}, not text; "
                        f"set the field to a text column")
    return bool(value and value.strip())


def _jsonl_texts(unit: Unit, field: str, on_bad_line: BadLine, result: UnitResult) -> Iterator[tuple[int, str]]:
    # The unit owns the lines that start in [start, end): seek one byte early and drop the rest of that line.
    with open(unit.path, "rb") as lines:
        if unit.start > 0:
            lines.seek(unit.start - 1)
            lines.readline()
        while (offset := lines.tell()) < unit.end:
            line = lines.readline()
            if not line:
                break
            if not line.strip():
                continue
            text, problem = record_text(line, field)
            if problem is None:
                yield offset, text
                continue
            where = _where(unit, offset)
            if on_bad_line == "stop":
                fix = "set --field to the text's key" if problem.startswith("no field") else "fix the line"
                raise UserError(f"{where}: {problem}; {fix}, or skip bad lines (--on-bad-line skip)")
            result.skipped += 1
            result.first_skipped = result.first_skipped or f"{where}: {problem}"


def _where(unit: Unit, position: int) -> str:
    """The place of a document in its source, for an error: file:line, file: row N, or the text file."""
    if unit.kind == "jsonl":
        return f"{unit.path}:{_line_number(unit.path, position)}"
    return unit.path if unit.kind == "text" else f"{unit.path}: row {position}"


def _line_number(path: str, offset: int) -> int:
    # Counted only when a line is reported: units start mid-file, and counting every line would cost a pass.
    with open(path, "rb") as data:
        return data.read(offset).count(b"\n") + 1


# ---- tokenizing and writing (worker processes) --------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_json: str, parent: int) -> None:
    # One core a process: the tokenizers library's own thread pool would compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
    global _worker_tokenizer
    _worker_tokenizer = _backend(tokenizer_json)


def _exit_with(parent: int, interval_s: float = 1.0) -> None:
    """End this worker once `parent`, the prepare that started it, is gone. A pool's workers wait on a queue
    whose writing end they hold themselves, so a prepare killed outright (kill -9, the OOM killer) would leave
    them waiting forever, each holding its memory and the terminal's output."""
    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(1)


def _backend(tokenizer_json: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True
    return tokenizer


def _prepare_unit(
    unit: Unit, staging: str, field: str, settings: dict[str, Any], on_bad_line: BadLine
) -> UnitResult:
    result = UnitResult(unit.index)
    eos, dtype = settings["eos_id"], np.dtype(settings["dtype"])
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    pending = dict.fromkeys(SPLITS, 0)  # tokens in parts
    documents = unit_texts(unit, field, on_bad_line, result)
    while batch := _take(documents, ENCODE_BATCH):
        positions, texts = zip(*batch)
        in_val = _draw(settings["seed"], unit.file_index, np.array(positions)) < settings["val_fraction"]
        encodings = _worker_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for position, encoding, val in zip(positions, encodings, in_val):
            ids = encoding.ids
            ids.append(eos)
            if len(ids) > MAX_DOCUMENT_TOKENS:
                raise UserError(f"{_where(unit, position)}: a document of {len(ids):,} tokens, more than a shard holds "
                                f"({MAX_DOCUMENT_TOKENS:,}); split it into smaller documents")
            split = "val" if val else "train"
            parts[split].append(np.asarray(ids, dtype=dtype))
            pending[split] += len(ids)
            if pending[split] >= SHARD_TOKENS:
                _flush(parts[split], Path(staging), split, unit.index, result)
                pending[split] = 0
    for split, encoded in parts.items():
        if encoded:
            _flush(encoded, Path(staging), split, unit.index, result)
    for split in SPLITS:
        result.documents[split] = sum(shard["documents"] for shard in result.shards[split])
        result.tokens[split] = sum(shard["tokens"] for shard in result.shards[split])
    return result


def _flush(encoded: list[np.ndarray], staging: Path, split: str, index: int, result: UnitResult) -> None:
    """Write a unit's pending documents of `split` as its next shard (`NNNNN.arrow`, then `NNNNN-001.arrow` ...)."""
    shards = result.shards[split]
    file = f"{split}/{index:05d}{f'-{len(shards):03d}' if shards else ''}.arrow"
    _write_shard(staging / file, encoded)
    shards.append({"file": file, "documents": len(encoded), "tokens": sum(len(document) for document in encoded)})
    encoded.clear()


def _take(iterator: Iterator[tuple[int, str]], count: int) -> list[tuple[int, str]]:
    return [document for _, document in zip(range(count), iterator)]


def _draw(seed: int, file_index: int, positions: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per document, a hash (splitmix64) of (seed, file, position): the split is
    the same whatever the units or the number of workers."""
    with np.errstate(over="ignore"):
        offset = (seed * 0x9E3779B97F4A7C15 + file_index * 0xD1B54A32D192ED03) % 2**64
        x = positions.astype(np.uint64) + np.uint64(offset)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _write_shard(path: Path, documents: list[np.ndarray]) -> None:
    import pyarrow as pa

    ArrowWriter = require_datasets().arrow_writer.ArrowWriter
    lengths = np.fromiter((len(document) for document in documents), dtype=np.int64, count=len(documents))
    # int32 offsets (a plain list column, which every `datasets` release reads): a shard is below 2**31 tokens.
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(documents)))
    try:
        with ArrowWriter(path=str(path), writer_batch_size=len(documents)) as writer:
            writer.write_table(pa.table({"input_ids": column}))
            writer.finalize()
    except OSError as error:
        raise Resumable(f"{path}: could not write this shard ({error.strerror or error}); the units done are kept: "
                        f"free space and run the same prepare again to continue") from error


# ---- the whole preparation ----------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type holding every id (half the disk and read bandwidth for vocabularies < 64k)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_json(tokenizer: Any) -> str:
    """The serialized `tokenizers` form of an HF fast tokenizer (or a `tokenizers.Tokenizer`)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise UserError(f"preparing shards needs a fast tokenizer (tokenizers library); got {type(tokenizer).__name__}")
    return backend.to_str()


def prepared_identity(files: Sequence[Path], tokenizer_text: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What the shards are made from, as the manifest records it (so that a refusal can say what changed)."""
    stats = [[str(path.resolve()), *_size_and_mtime(path)] for path in files]
    return {"source_stats": stats, "tokenizer": fingerprint(tokenizer_text), **settings}


def prepared_key(identity: dict[str, Any]) -> str:
    return fingerprint(PREPARED_FORMAT, sorted(identity.items()))


def _changes(manifest: dict[str, Any], identity: dict[str, Any]) -> str:
    """What differs between a prepared directory's identity and a request's, in words."""
    changes = []
    for name, value in identity.items():
        then = manifest.get(name)
        if then == value:
            continue
        if name == "source_stats":
            before = {path: stat for path, *stat in then or []}
            changed = [path for path, *stat in value if before.get(path) != stat]
            gone = sorted(before.keys() - {path for path, *_ in value})
            changes += [f"{path} {'added or edited' if path not in before else 'edited'}" for path in changed]
            changes += [f"{path} no longer a source" for path in gone]
        else:
            changes.append("the tokenizer" if name == "tokenizer" else f"{name} {then!r}, now {value!r}")
    return "; ".join(changes) or "its format"


def _size_and_mtime(path: Path) -> tuple[int, int]:
    if path.is_dir():  # a saved dataset: its files' sizes and mtimes
        entries = sorted(path.rglob("*"))
        return sum(entry.stat().st_size for entry in entries), max(entry.stat().st_mtime_ns for entry in entries)
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory (a directory without one was never completed)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{path}: not a prepared directory (no {MANIFEST}); run `forgather data prepare --out {path}`")
    try:
        content = json.loads(manifest.read_bytes())
    except ValueError as error:  # not JSON, or not text
        content, problem = None, f"not JSON ({str(error).splitlines()[0]})"
    else:
        problem = _manifest_problem(content)
    if problem:
        raise UserError(f"{manifest}: not the manifest that was prepared ({problem}): a file edited or cut short; "
                        f"prepare the corpus again, into a new directory or after deleting {path}")
    return content


def _manifest_problem(content: Any) -> str:
    """What a manifest read back lacks ("" when nothing): the fields the stream and the key check read."""
    if not isinstance(content, dict):
        return f"a JSON {type(content).__name__}, not an object"
    missing = [name for name in ("key", "pad_id", "shards") if name not in content]
    if missing:
        return f"no {', '.join(map(repr, missing))}"
    shards = content["shards"]
    if not (isinstance(shards, dict) and all(isinstance(shards.get(split), list) for split in SPLITS)):
        return "its 'shards' is not a list of train and val shards"
    if not all(isinstance(shard, dict) and {"file", "tokens"} <= shard.keys() for split in SPLITS for shard in shards[split]):
        return "a shard without its 'file' or 'tokens'"
    return ""


def prepare(
    sources: Sequence[str | Path],
    tokenizer: Any,
    out: str | Path | None,
    field: str = "text",
    val_fraction: float = 0.02,
    seed: int = 0,
    num_workers: int | None = None,
    on_bad_line: BadLine = "stop",
    progress: bool = True,
    unit_bytes: int | None = None,
) -> dict[str, Any]:
    """Tokenize `sources` into shards under `out` (default: `<cache>/prepared/<key>`, see
    `forgather.data.cache`); returns the manifest, whose "path" is the directory. An existing `out` prepared
    with the same key is kept as it is; an empty one is filled; one holding anything else is refused."""
    if on_bad_line not in ("stop", "skip"):
        raise UserError(f"on_bad_line must be 'stop' or 'skip', got {on_bad_line!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; give the share of documents to hold "
                        f"out for validation (--val-fraction 0.02)")
    if num_workers is not None and num_workers < 1:
        raise UserError(f"num_workers must be at least 1, got {num_workers}; give a number of processes "
                        f"(--workers N, prepare_workers=N), or none for every core")
    files = source_files(sources, Path(out) if out is not None else None)
    text = tokenizer_json(tokenizer)
    backend = _backend(text)
    eos_id = _eos_id(tokenizer, backend)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    settings = {
        "field": field,
        "val_fraction": val_fraction,
        "seed": seed,
        "eos_id": eos_id,
        "pad_id": pad_id if pad_id is not None else eos_id,  # fills the last block of a shard when streaming
        "dtype": token_dtype(backend.get_vocab_size(with_added_tokens=True)),
        "unit_bytes": unit_bytes or _unit_bytes(files),  # with the sources' sizes, it fixes the units: the shards
    }
    identity = prepared_identity(files, text, settings)
    key = prepared_key(identity)
    out = Path(out) if out is not None else cache_dir("prepared") / key
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty directory is filled
        return _existing(out, key, identity)
    units = work_units(files, field, settings["unit_bytes"])
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(units)))
    staging = out.parent / f".{out.name}.{key}.tmp"
    _remove_abandoned_staging(out, keep=staging)
    with _staging_directory(staging, out) as writing:
        if writing:
            done = _finished_units(staging)
            if done:
                print(f"{out}: continuing an interrupted prepare, {len(done)} of {len(units)} units done", file=sys.stderr, flush=True)
            todo = [unit for unit in units if unit.index not in done]
            results = [*done.values(), *_run_units(todo, staging, text, field, settings, on_bad_line, workers, progress)]
            manifest = _manifest(key, files, identity, sorted(results, key=lambda result: result.index))
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return _existing(out, key, identity)  # also when another prepare of the same work completed it while this one waited


class Resumable(UserError):
    """A prepare stopped by no fault of its input (a tokenizer process killed, a full disk): the units done are
    kept for the next prepare."""


@contextmanager
def _staging_directory(staging: Path, out: Path) -> Iterator[bool]:
    """Fill `staging` (kept from an interrupted prepare of the same work, or new) under its writer's lock, then
    rename it to `out`. Yields False, with nothing to fill, when another prepare of the same work held the lock
    and completed `out` while this one waited. An error in the input (a bad line) deletes it; an interruption
    (Ctrl-C, a kill, a lost worker, a full disk) keeps it for the next prepare."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_staging(staging, out)
    if lock is None:
        yield False
        return
    with lock:
        try:
            yield True
        except UserError as error:
            if not isinstance(error, Resumable):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / WRITER_LOCK).unlink()
        shutil.rmtree(staging / UNITS_DIR)
        publish_directory(staging, out, finished=lambda path: (path / MANIFEST).is_file())


def _lock_staging(staging: Path, out: Path):
    """The open writer's lock of `staging` (created if missing), held; None once `out` is complete. A prepare of
    the same work holding it (a sweep's runs, or the nodes of a job, starting together) is waited for: it ends by
    publishing `out`, by deleting `staging` (an error) or by dying (its lock dropped, its units kept for this one)."""
    waited = False
    while not (out / MANIFEST).is_file():
        try:
            for directory in (staging, *(staging / split for split in SPLITS), staging / UNITS_DIR):
                directory.mkdir(exist_ok=True)
            lock = open(staging / WRITER_LOCK, "a")
        except FileNotFoundError:
            continue  # the other writer published or deleted it between two of these steps
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                print(f"{out}: another process is preparing the same corpus into it; waiting for it to end",
                      file=sys.stderr, flush=True)
                waited = True
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = os.stat(staging / WRITER_LOCK)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(lock.fileno())):
            if not (out / MANIFEST).is_file():
                return lock
            shutil.rmtree(staging, ignore_errors=True)  # made anew just after the other writer published out
        lock.close()
    return None


def _finished_units(staging: Path) -> dict[int, UnitResult]:
    """The units an interrupted prepare finished in `staging`, from their records."""
    done = {}
    for path in sorted((staging / UNITS_DIR).glob("*.json")):
        record = json.loads(path.read_text())
        done[record["index"]] = UnitResult(**record)
    return done


def _record_unit(staging: Path, result: UnitResult) -> None:
    """Written once the unit's shards are: a unit with a record is never tokenized again."""
    atomic_write(staging / UNITS_DIR / f"{result.index:05d}.json", lambda path: path.write_text(json.dumps(asdict(result))))


def _remove_abandoned_staging(out: Path, keep: Path) -> None:
    """Delete the staging directories of killed prepares of `out` for other work than `keep`'s (a large
    corpus's would fill the disk)."""
    for staging in out.parent.glob(f".{out.name}.*.tmp"):
        if staging == keep:
            continue
        try:
            lock = os.open(staging / WRITER_LOCK, os.O_RDONLY)  # never created here: a new writer's is its own
        except FileNotFoundError:
            continue  # created a moment ago, its writer has not locked it yet
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its writer is alive
        finally:
            os.close(lock)
        shutil.rmtree(staging, ignore_errors=True)


def _unit_bytes(files: Sequence[Path]) -> int:
    # From the corpus alone, never the number of workers, so that a key names one set of shards whatever
    # --workers was. 64 units keep 16 workers busy to the end on a small corpus; 64 MiB bounds a worker's memory.
    jsonl = sum(path.stat().st_size for path in files if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES)
    return int(min(max(jsonl // UNITS_PER_CORPUS, 1 << 20), UNIT_BYTES))


def _eos_id(tokenizer: Any, backend) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        for token in ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>"):
            eos = backend.token_to_id(token)
            if eos is not None:
                break
    if eos is None:
        raise UserError("the tokenizer has no eos token (documents are separated by eos); set its eos_token")
    return int(eos)


def _existing(out: Path, key: str, identity: dict[str, Any]) -> dict[str, Any]:
    if not (out / MANIFEST).is_file():
        what = "a directory of other files" if out.is_dir() else "a file"
        raise UserError(f"{out}: {what}, not a prepared directory (no {MANIFEST}); give a new or empty directory to "
                        f"prepare into")
    manifest = read_manifest(out)
    if manifest.get("format") != PREPARED_FORMAT:
        raise UserError(f"{out}: prepared by an earlier forgather (format {manifest.get('format')}, now {PREPARED_FORMAT}: "
                        f"its shards may depend on the number of workers); delete it and prepare again, or prepare "
                        f"into another directory")
    if manifest.get("key") != key:
        raise UserError(
            f"{out}: prepared from other sources, tokenizer or settings ({_changes(manifest, identity)}; key "
            f"{manifest.get('key')}, these give {key}); delete it or prepare into another directory"
        )
    return {**manifest, "path": str(out)}


def _run_units(units, staging, text, field, settings, on_bad_line, workers, progress) -> list[UnitResult]:
    results: list[UnitResult] = []
    with _Progress(len(units), progress) as bar, ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(text, os.getpid())
    ) as pool:
        futures = [pool.submit(_prepare_unit, unit, str(staging), field, settings, on_bad_line) for unit in units]
        order = {future: position for position, future in enumerate(futures)}
        # Units run in parallel, so a later unit's bad line may be found first: the error reported is the one
        # of the earliest unit that failed (units are in file order), whatever the workers' timing.
        failures: dict[int, UserError] = {}
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise Resumable(f"a tokenizer process died (killed: out of memory?, or it failed to start: see "
                                    f"its error above) after {len(results)} of the {len(units)} units to do; those "
                                    f"are kept: run the same prepare again to continue, with fewer workers "
                                    f"(--workers, prepare_workers) if memory ran out") from None
                except UserError as error:
                    failures[order[future]] = error
                    for later in futures[min(failures) + 1:]:
                        later.cancel()
                    continue
                _record_unit(Path(staging), result)
                results.append(result)
                bar.advance(result)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        if failures:
            raise failures[min(failures)]
    return sorted(results, key=lambda result: result.index)


def _manifest(key, files, identity, results: list[UnitResult]) -> dict[str, Any]:
    shards = {split: [shard for r in results for shard in r.shards[split]] for split in SPLITS}
    if not shards["train"]:
        held_out = sum(r.documents["val"] for r in results)
        if held_out:  # a corpus of a document or two: the hash drew every one for validation
            raise UserError(f"{', '.join(map(str, files))}: every document of the corpus ({held_out}) fell in the "
                            f"validation split (val_fraction={identity['val_fraction']}), none is left to train on; "
                            f"add documents, or set val_fraction 0 (--val-fraction 0)")
        skipped = sum(r.skipped for r in results)
        if skipped:  # --on-bad-line skip over a corpus read with the wrong --field skips every line
            first = next(r.first_skipped for r in results if r.first_skipped)
            raise UserError(f"{', '.join(map(str, files))}: the corpus has no documents: every line was bad and skipped "
                            f"({skipped}; the first: {first}); fix the lines or set --field")
        raise UserError(f"{', '.join(map(str, files))}: the corpus has no documents (empty files or fields)")
    skipped = sum(r.skipped for r in results)
    return {
        "format": PREPARED_FORMAT,
        "key": key,
        "sources": [str(path) for path in files],
        **identity,
        "skipped_lines": skipped,
        "first_skipped": next((r.first_skipped for r in results if r.first_skipped), ""),
        "shards": shards,
    }


class _Progress:
    """A rich progress bar over the work units, with documents, tokens, tokens/s, ETA."""

    def __init__(self, total_units: int, enabled: bool):
        self.total_units, self.enabled = total_units, enabled
        self.documents = self.tokens = 0
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("prepare"), BarColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("prepare", total=self.total_units, stats="")
        return self

    def advance(self, result: UnitResult) -> None:
        self.documents += sum(result.documents.values())
        self.tokens += sum(result.tokens.values())
        if self.enabled:
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            stats = f"{self.documents:,} docs {self.tokens:,} tokens {rate / 1e6:.2f}M tok/s"
            self.bar.update(self.task, advance=1, stats=stats)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def summary(manifest: dict[str, Any]) -> str:
    """One line about a prepared directory: documents and tokens per split, skipped lines."""
    parts = []
    for split in SPLITS:
        shards = manifest["shards"][split]
        documents, tokens = sum(s["documents"] for s in shards), sum(s["tokens"] for s in shards)
        parts.append(f"{split}: {len(shards)} shards, {documents:,} documents, {tokens:,} tokens")
    if manifest.get("skipped_lines"):
        parts.append(f"skipped {manifest['skipped_lines']} bad lines (first: {manifest['first_skipped']})")
    return "; ".join(parts)


class PreparedCorpus:
    """A corpus streamed from prepared shards: the directory `path` (default: one under the cache, named by
    the key) and what it is prepared from (`sources`, default the embedded stdlib corpus) with which settings.
    It is the `documents` of a `TextDataModule` for `data=streaming`: the module prepares it when `path` is
    missing and then streams it (`forgather.data.stream`). Iterating it yields the sources' texts, so a
    tokenizer can be trained on it. `unit_bytes` (tests) sets the size of a jsonl unit, as `prepare`'s does."""

    def __init__(
        self,
        path: str | Path | None = None,
        sources: Sequence[str | Path] | str | None = None,
        field: str = "text",
        val_fraction: float = 0.02,
        seed: int = 0,
        num_workers: int | None = None,
        on_bad_line: BadLine = "stop",
        unit_bytes: int | None = None,
    ):
        self.path = Path(path) if path is not None else None
        self._sources = [sources] if isinstance(sources, (str, Path)) else sources
        self.field, self.val_fraction, self.seed = field, val_fraction, seed
        self.num_workers, self.on_bad_line, self.unit_bytes = num_workers, on_bad_line, unit_bytes

    @property
    def sources(self) -> list[str | Path]:
        if self._sources is None:
            from forgather.data.corpus import stdlib_corpus_path

            return [stdlib_corpus_path()]
        return list(self._sources)

    def __iter__(self) -> Iterator[str]:
        for unit in work_units(source_files(self.sources, self.path), self.field):
            yield from (text for _, text in unit_texts(unit, self.field, self.on_bad_line, UnitResult(unit.index)))

    def prepare(self, tokenizer: Any, progress: bool = True) -> Path:
        """Prepare the shards if their directory is missing (else check they match); returns the directory."""
        manifest = prepare(
            self.sources, tokenizer, self.path, self.field, self.val_fraction, self.seed,
            self.num_workers, self.on_bad_line, progress, self.unit_bytes,
        )
        self.key = str(manifest["key"])  # what the shards hold: their sources, tokenizer and settings
        return Path(manifest["path"])

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.path)!r}, sources={self._sources!r})"
