"""On-disk cache for data artifacts: where it lives, atomic writes, and content fingerprints.

The cache root is `$FORGATHER_CACHE_DIR` when set, else `platformdirs.user_cache_dir("forgather")`.
Every artifact is written to a temporary sibling and moved into place with `os.replace`, so a reader
sees either nothing or a complete file (or directory), never a half-written one, even when several
processes (DDP ranks) build the same artifact at once. The results get the usual modes (files 0644,
directories 0755) rather than the private ones of `tempfile`. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

CACHE_ENV = "FORGATHER_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """The cache directory (or a sub-directory of it named by `parts`), created on demand."""
    root = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("forgather")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file among `path`'s parents that keeps it from being created (a path through a file), or None."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then move it onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes `path` (if another writer won the race,
    its equal result is kept and ours is dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(staging: Path, path: Path, finished: Callable[[Path], bool] = Path.is_dir) -> None:
    """Rename the filled directory `staging` to `path`. When `path` appeared meanwhile (a non-empty directory
    cannot be replaced) and `finished(path)` says a concurrent writer completed the same work there, that
    result is kept and `staging` is deleted; otherwise the rename's error is raised."""
    os.chmod(staging, 0o755)
    try:
        os.replace(staging, path)
    except OSError:
        if not finished(path):
            raise
        shutil.rmtree(staging, ignore_errors=True)


def fingerprint(*parts: object) -> str:
    """A short stable hash of the given values' reprs (for cache keys built from settings)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def documents_fingerprint(documents: Iterable[str]) -> str:
    """A short stable hash of a sequence of documents' texts, their order and boundaries included."""
    digest = hashlib.sha256()
    for text in documents:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:16]
