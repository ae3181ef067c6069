"""Document sources for the user's own data: text files, jsonl, and Hugging Face datasets saved on disk.

Every loader returns a list of non-empty document strings in a deterministic order, ready to be the
`documents` of a `TextDataModule` or the training iterator of a tokenizer. Torch-free.

Text files: a path is a file or a directory (searched recursively for `pattern`, sorted by relative path).
With `split="file"` each file is one document; with `split="paragraph"` every block of lines separated by
one or more blank lines is a document (suits corpora that store one article or paragraph per block).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

# A documents source: the texts themselves, or a zero-argument callable returning them (read lazily).
Documents = Iterable[str] | Callable[[], Iterable[str]]

# A byte order mark some editors (Windows Notepad) write at the start of a UTF-8 file: not part of the text.
_BOM = "\ufeff"
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


def resolve_documents(documents: Documents) -> Iterable[str]:
    """The texts of a documents source (calling it when it is a callable)."""
    return documents() if callable(documents) else documents


def text_documents(
    paths: str | Path | Iterable[str | Path],
    split: Literal["file", "paragraph"] = "file",
    pattern: str = "*.txt",
    encoding: str = "utf-8",
) -> list[str]:
    """Documents from text files or directories: one per file, or one per blank-line separated block."""
    if split not in ("file", "paragraph"):
        raise ValueError(f"text_documents: split must be 'file' or 'paragraph', got {split!r}")
    documents = []
    for path in _text_files(paths, pattern):
        try:
            text = path.read_text(encoding=encoding).replace("\r\n", "\n").removeprefix(_BOM)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not {encoding} text ({error.reason} at byte {error.start}); convert it, or "
                             f"leave it out (data_pattern=)") from error
        documents.extend(_paragraphs(text) if split == "paragraph" else [text])
    return _non_empty(documents)


def _paragraphs(text: str) -> list[str]:
    return [block.strip("\n") for block in _BLANK_LINES.split(text)]


def _text_files(paths: str | Path | Iterable[str | Path], pattern: str) -> list[Path]:
    files = _listed_files(paths, pattern)
    named: dict[Path, Path] = {}
    for file in files:  # a file read twice would be two documents, one of them possibly in validation
        first = named.setdefault(file.resolve(), file)
        if first is not file:
            raise ValueError(f"{file}: named twice in data_paths (also as {first}); each file is read once: "
                             f"leave it out of the list, or narrow data_pattern")
    return files


def _listed_files(paths: str | Path | Iterable[str | Path], pattern: str) -> list[Path]:
    files = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted((f for f in path.rglob(pattern) if f.is_file()), key=lambda f: f.relative_to(path).as_posix())
            if not found:
                raise FileNotFoundError(f"{path}: no file in this directory matches {pattern!r}; set the pattern "
                                        f"(data_pattern='*.md') or give other data_paths")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            if any(char in path.name for char in "*?["):  # a glob, as `forgather data prepare --source` takes
                raise FileNotFoundError(f"{path}: no such file or directory (data_paths takes no globs); give the "
                                        f"directory and the pattern: data_paths={path.parent} "
                                        f"data_pattern='{path.name}'")
            raise FileNotFoundError(f"{path}: no such file or directory; check data_paths")
    return files


def jsonl_documents(path: str | Path, field: str = "text", encoding: str = "utf-8") -> list[str]:
    """Documents from the `field` of each line of a jsonl file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a jsonl file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {what}; check data_path")
    documents = []
    with path.open("rb") as lines:  # bytes: a line that is not text is reported with its number
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                line = line.decode(encoding)
                if number == 1:
                    line = line.removeprefix(_BOM)
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not {encoding} text ({error.reason} at byte {error.start} of the "
                                 f"line); fix the line") from error
            text, problem = record_text(line, field)
            if problem is None:
                documents.append(text)
            elif problem.startswith(("no field", "field")):  # the line is JSON: the field is the thing to set
                raise KeyError(f"{path}:{number}: {problem}; set field= (data_field= on the command line) to the text key")
            else:
                raise ValueError(f"{path}:{number}: {problem}; fix the line")
    return _non_empty(documents)


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds half of a UTF-16 surrogate pair (a JSON escape such as \\ud800 gives one), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"a lone surrogate {text[error.start]!r} at character {error.start}"
    return None


def preview(value: object) -> str:
    """`repr(value)`, cut to 40 characters: a value that is not text, shown in an error."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def record_text(line: str | bytes, field: str) -> tuple[str | None, str | None]:
    """(the text in `field` of one jsonl line, None), or (None, what is wrong with the line, worded to follow
    "path:line: "). One wording for both jsonl readers: `jsonl_documents` and `forgather data prepare`'s."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, (f"not valid JSON ({error.msg} at column {error.colno}); each line of a jsonl file holds "
                      "one JSON object")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 text ({error.reason} at byte {error.start} of the line)"
    if not isinstance(record, dict):
        return None, f"not a JSON object but a {type(record).__name__}; each line holds an object with the text's field"
    if field not in record:
        return None, f"no field {field!r} in this record (its fields: {', '.join(map(str, record)) or 'none'})"
    if not isinstance(record[field], str):
        return None, f"field {field!r} is not text but {type(record[field]).__name__} {preview(record[field])}"
    if (surrogate := lone_surrogate(record[field])) is not None:
        return None, f"{surrogate} of field {field!r}, which is no text (JSON allows it, UTF-8 and the tokenizer do not)"
    return record[field], None


def hf_documents(path: str | Path, column: str = "text", split: str | None = None) -> list[str]:
    """Documents from the `column` of a Hugging Face dataset saved with `save_to_disk`.

    A saved DatasetDict needs `split` (default "train" when it has one).
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf_documents needs the Hugging Face datasets library: pip install datasets") from error
    path = Path(path)
    if not path.is_dir():
        what = "a file, not a directory saved with save_to_disk" if path.exists() else "no such directory"
        raise FileNotFoundError(f"{path}: {what}; check data_path")
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:  # a directory, but without a saved dataset's files
        raise FileNotFoundError(f"{path}: not a dataset saved with save_to_disk; give data_path a directory "
                                f"written by Dataset.save_to_disk, or read files with data=jsonl or "
                                f"data=text_files") from error
    if isinstance(dataset, datasets.DatasetDict):
        split = split or ("train" if "train" in dataset else None)
        if split not in dataset:
            what = f"no split {split!r}" if split else "no 'train' split"
            raise KeyError(f"{path}: {what} in this DatasetDict; set split= (data_split= on the command line) to one "
                           f"of {sorted(dataset)}")
        dataset = dataset[split]
    if column not in dataset.column_names:
        raise KeyError(f"{path}: no column {column!r}; set column= (data_column= on the command line) to one of "
                       f"{dataset.column_names}")
    kind = getattr(dataset.features[column], "dtype", None) or type(dataset.features[column]).__name__
    if kind not in ("string", "large_string"):
        raise KeyError(f"{path}: column {column!r} holds {kind}, not text; set column= (data_column= on the command "
                       f"line) to a text column")
    return _non_empty(dataset[column])


def _non_empty(documents: Iterable[str]) -> list[str]:
    return [document for document in documents if document and document.strip()]
