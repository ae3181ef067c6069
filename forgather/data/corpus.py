"""The embedded default corpus: real English that every Python install already carries.

Documents, in this fixed order:
1. the documentation topics of `pydoc_data.topics` (one document per topic, sorted by topic name);
2. the docstrings of the standard library's pure-Python modules (one document per module, class or
   function docstring), found by walking the stdlib directory with `pkgutil.iter_modules` and parsing each
   file with `ast` -- nothing is imported, so no module's side effects run. Modules are visited in sorted
   name order; the test suites (`test`, `tests`, `idle_test`) and `site-packages` are skipped.
Documents shorter than `min_chars` characters are skipped, and exact duplicates keep only their first
occurrence (so a validation split never sees a copy of a training document).

The extraction runs once per Python version and is cached as jsonl (`{"source": ..., "text": ...}` per
line) under the Forgather cache dir (see `forgather.data.cache`), written atomically. No download.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import platform
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from forgather.data.cache import atomic_write, cache_dir

# Bump when the extraction rules change, so stale caches are not reused.
CORPUS_FORMAT = 1
DEFAULT_MIN_CHARS = 64
SKIPPED_PACKAGES = frozenset({"test", "tests", "idle_test", "site-packages"})
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def pydoc_topics() -> Iterator[tuple[str, str]]:
    """(source, text) for each topic of the stdlib's pydoc documentation, sorted by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name].strip()


def stdlib_module_files(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(dotted module name, source file) for every pure-Python stdlib module, in sorted order, unimported."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    yield from _walk_modules(root, prefix="")


def _walk_modules(directory: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    for info in sorted(pkgutil.iter_modules([str(directory)]), key=lambda info: info.name):
        if info.name in SKIPPED_PACKAGES:
            continue
        name = prefix + info.name
        if info.ispkg:
            package = directory / info.name
            if (package / "__init__.py").is_file():
                yield name, package / "__init__.py"
            yield from _walk_modules(package, prefix=f"{name}.")
        elif (directory / f"{info.name}.py").is_file():
            # iter_modules also lists compiled extensions; only Python source has docstrings to parse.
            yield name, directory / f"{info.name}.py"


def module_docstrings(module: str, path: Path) -> Iterator[tuple[str, str]]:
    """(source, text) for the module, class and function docstrings of one source file, in ast.walk order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return  # a few stdlib files are deliberately invalid (grammar fixtures); they hold no prose
    for node in ast.walk(tree):
        if isinstance(node, _DOCSTRING_OWNERS):
            text = ast.get_docstring(node, clean=True)
            if text:
                name = getattr(node, "name", "")
                yield f"doc:{module}{':' + name if name else ''}:{getattr(node, 'lineno', 0)}", text


def extract_stdlib_corpus(min_chars: int = DEFAULT_MIN_CHARS, root: Path | None = None) -> Iterator[dict]:
    """The corpus records, freshly extracted (no cache): `{"source": str, "text": str}` each."""
    seen: set[str] = set()
    docstrings = (doc for module, path in stdlib_module_files(root) for doc in module_docstrings(module, path))
    for source, text in (*pydoc_topics(), *docstrings):
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            yield {"source": source, "text": text}


def stdlib_corpus_path(min_chars: int = DEFAULT_MIN_CHARS) -> Path:
    """The cached corpus jsonl for this Python version, extracted and written (atomically) on first use."""
    version = f"{sys.implementation.name}{platform.python_version()}"
    path = cache_dir("corpus") / f"stdlib-{version}-v{CORPUS_FORMAT}-min{min_chars}.jsonl"
    if not path.is_file():
        atomic_write(path, lambda tmp: _write_jsonl(tmp, extract_stdlib_corpus(min_chars)))
    return path


def _write_jsonl(path: Path, records: Iterator[dict]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def stdlib_records(min_chars: int = DEFAULT_MIN_CHARS, max_documents: int | None = None) -> list[dict]:
    """The corpus records (`source`, `text`), read from the cache (extracting it on first use)."""
    records = []
    with stdlib_corpus_path(min_chars).open(encoding="utf-8") as lines:
        for line in lines:
            if max_documents is not None and len(records) >= max_documents:
                break
            records.append(json.loads(line))
    return records


def stdlib_documents(max_documents: int | None = None, min_chars: int = DEFAULT_MIN_CHARS) -> list[str]:
    """The corpus texts in their fixed order: the default `documents` source of a TextDataModule."""
    return [record["text"] for record in stdlib_records(min_chars, max_documents)]
