"""A conversion's destination appears whole or not at all, and never replaces a directory unasked.

`staged(dst, overwrite, source)` refuses an existing `dst` that is not an empty directory unless `overwrite` (at
once, before any conversion work), and refuses, even with `overwrite`, a `dst` that is `source` or holds it:
replacing it would delete the model being read (and, for a parent, every model beside it). Then it yields a staging directory beside `dst` (the same file system, so
moving it is a rename). When the block succeeds the staging directory becomes `dst`; when it fails or is
interrupted it is removed and `dst` is left as it was. Replacing a directory takes two renames (the old one
aside, the new one in) before the old one is deleted. The staging name carries the process id, so a
conversion killed outright leaves `.NAME.converting-PID`, which the next conversion to `NAME` removes once
that process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

STAGING = ".{name}.converting-{pid}"


class DestinationExists(FileExistsError):
    """The destination holds something and overwriting was not asked for."""


def _occupied(path: Path) -> bool:
    return path.is_symlink() or (path.exists() and not (path.is_dir() and not any(path.iterdir())))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_abandoned(dst: Path) -> None:
    """Staging directories of conversions to `dst` whose process no longer runs."""
    prefix = STAGING.format(name=dst.name, pid="")
    for leftover in dst.parent.glob(f"{prefix}*"):
        pid = leftover.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def staged(dst: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None) -> Iterator[Path]:
    """A staging directory that becomes `dst` when the block succeeds (see the module docstring)."""
    dst = Path(dst).absolute()
    read = Path(source).resolve() if source is not None else None
    if read is not None and dst.resolve() in (read, *read.parents):
        what = "is the source" if dst.resolve() == read else f"holds the source {source}"
        raise DestinationExists(f"{dst}: the destination {what}; replacing it would delete the model being "
                                f"converted, --overwrite or not; choose a new destination")
    if _occupied(dst) and not overwrite:
        raise DestinationExists(f"{dst} already exists; choose a new destination, or pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(dst)
    staging = dst.parent / STAGING.format(name=dst.name, pid=os.getpid())
    if staging.exists():  # an earlier conversion of this process that failed to clean up
        shutil.rmtree(staging)
    staging.mkdir()  # mkdir, not mkdtemp: the directory gets the umask's mode, as any the user creates
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    aside = None
    if _occupied(dst):
        aside = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        os.rename(dst, aside)
    os.replace(staging, dst)  # over an empty directory, or into a free name
    if aside is not None:
        _remove(aside)
