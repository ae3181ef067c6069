"""A conversion's destination appears whole or not at all, and never replaces a directory unasked.

`check_destination(dst, overwrite, sources)` refuses an existing `dst` that is not an empty directory unless
`overwrite`, a `dst` below a file, and, even with `overwrite`, a `dst` that is one of `sources` or holds one:
replacing it would delete what is being read (and, for a parent, everything beside it). `forgather export`
checks its --out with it too. `staged(dst, overwrite, source)` checks at once, before any conversion work,
then yields a staging directory beside `dst` (the same file system, so
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
from typing import Iterable, Iterator

from forgather.data.cache import file_in_the_way
from forgather.errors import UserError

STAGING = ".{name}.converting-{pid}"


class DestinationExists(UserError, FileExistsError):
    """The destination holds something that writing there would destroy; the message says what to do."""


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


def remove_abandoned(dst: Path, staging: str = STAGING) -> None:
    """Staging directories of writes to `dst` (named by `staging`, as STAGING) whose process no longer runs."""
    prefix = staging.format(name=dst.name, pid="")
    for leftover in dst.parent.glob(f"{prefix}*"):
        pid = leftover.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_destination(dst: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike] = (),
                      reading: str = "the model being converted") -> Path:
    """`dst` made absolute, when writing a new directory there destroys nothing (see the module docstring);
    `reading` names what `sources` are, for the message."""
    dst = Path(dst).absolute()
    for source in sources:
        read = Path(source).resolve()
        if dst.resolve() in (read, *read.parents):
            what = "is the source" if dst.resolve() == read else f"holds the source {source}"
            raise DestinationExists(f"{dst}: the destination {what}; replacing it would delete {reading}, "
                                    f"--overwrite or not; choose a new destination")
    blocking = file_in_the_way(dst)
    if blocking is not None:
        raise DestinationExists(f"{dst}: {blocking} is a file, not a directory; choose a destination outside it")
    if _occupied(dst) and not overwrite:
        raise DestinationExists(f"{dst} already exists; choose a new destination, or pass --overwrite to replace it")
    return dst


@contextlib.contextmanager
def staged(dst: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None) -> Iterator[Path]:
    """A staging directory that becomes `dst` when the block succeeds (see the module docstring)."""
    dst = check_destination(dst, overwrite, () if source is None else (source,))
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(dst)
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
