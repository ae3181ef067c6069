"""A conversion's destination appears whole or not at all, and never replaces a directory unasked.

`check_destination(dst, overwrite, sources)` refuses an existing `dst` that is not an empty directory unless
`overwrite`, a `dst` below a file, and, even with `overwrite`, a `dst` that is one of `sources` or holds one:
replacing it would delete what is being read (and, for a parent, everything beside it). `forgather export`
checks its --out with it too. `staged(dst, overwrite, source)` checks at once, before any conversion work,
then yields a staging directory beside `dst` (the same file system, so
moving it is a rename). When the block succeeds the staging directory becomes `dst` (`replace_with`); when it
fails or is interrupted it is removed and `dst` is left as it was.

Replacing a directory takes two renames: the old one aside (`.NAME.replaced-PID`), the new one in; only then
is the old one renamed to the staging name and deleted. So an aside left behind always holds the whole
previous `dst`: a writer killed between the two renames leaves it and no `dst`, and the next write to `dst`
(`restore_replaced`, which the model export shares with its `.NAME.old-PID`) first moves it back, so the
user's model is never lost and a rerun with --overwrite replaces it as asked. The staging name carries the
process id, so a conversion killed outright leaves `.NAME.converting-PID`, which the next conversion to
`NAME` removes once that process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from forgather.data.cache import file_in_the_way
from forgather.errors import UserError

STAGING = ".{name}.converting-{pid}"
ASIDE = ".{name}.replaced-{pid}"


class DestinationExists(UserError, FileExistsError):
    """The destination holds something that writing there would destroy; the message says what to do."""


class RestoredWarning(UserWarning):
    """A model that a killed writer had moved aside is back at its destination (or kept beside it)."""


def _occupied(path: Path) -> bool:
    return path.is_symlink() or (path.exists() and not (path.is_dir() and not any(path.iterdir())))


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a staging name's writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _abandoned(dst: Path, pattern: str) -> list[Path]:
    """The entries beside `dst` named by `pattern` (as STAGING) whose writer is gone: a dead process, or this
    one (whose own writes clean up after themselves, so what it left is from an earlier, failed write)."""
    prefix = pattern.format(name=dst.name, pid="")
    found = []
    for leftover in dst.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name.removeprefix(prefix)
        if pid.isdigit() and (int(pid) == os.getpid() or not process_alive(int(pid))):
            found.append(leftover)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_abandoned(dst: Path, staging: str = STAGING) -> None:
    """Staging directories of writes to `dst` (named by `staging`, as STAGING) whose process no longer runs."""
    for leftover in _abandoned(dst, staging):
        with contextlib.suppress(OSError):
            _remove(leftover)


def restore_replaced(dst: str | os.PathLike, aside: str = ASIDE, keep: bool = True) -> Path | None:
    """Put back the previous `dst` that a writer killed between its two renames left aside (named by `aside`,
    as ASIDE), with a RestoredWarning; returns where it was, or None when there was nothing to restore. An
    aside beside a `dst` written since is kept, with a warning saying so (`keep`), or deleted: for a writer
    that replaces `dst` whatever it holds (a run's own export)."""
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return None
    restored = None
    for leftover in sorted(_abandoned(dst, aside), key=lambda path: path.lstat().st_mtime, reverse=True):
        if restored is None and not _occupied(dst):
            if dst.is_dir() and not dst.is_symlink():
                dst.rmdir()  # empty
            os.rename(leftover, dst)
            restored = leftover
            warnings.warn(f"{dst}: restored the model that an interrupted conversion or export had moved aside to "
                          f"{leftover.name} (killed before it could write the new one)", RestoredWarning, stacklevel=2)
        elif not keep:
            _remove(leftover)
        else:
            warnings.warn(f"{leftover}: holds the model {dst} held before a conversion or export killed while "
                          f"replacing it; {dst} was written since, so it is kept: delete it, or move it back",
                          RestoredWarning, stacklevel=2)
    return restored


def replace_with(staging: Path, dst: Path, aside: str = ASIDE) -> None:
    """Move the finished `staging` to `dst`: an occupied `dst` goes aside first (named by `aside`), and is
    deleted only once the new one is in place (see the module docstring); interrupted in between (an error,
    Ctrl-C), the old `dst` is put back."""
    previous = None
    if _occupied(dst):
        previous = dst.parent / aside.format(name=dst.name, pid=os.getpid())
        os.rename(dst, previous)
    try:
        os.replace(staging, dst)  # over an empty directory, or into a free name
    except BaseException:
        if previous is not None:
            os.rename(previous, dst)
        raise
    if previous is not None:
        # Renamed to the staging name first: a kill during the deletion leaves staging, never a partial aside.
        os.rename(previous, staging)
        _remove(staging)


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
    if restore_replaced(dst) is not None:  # before the check: a restored model is one only --overwrite replaces
        remove_abandoned(Path(dst).absolute())  # the killed writer's staging, also when the check refuses
    dst = check_destination(dst, overwrite, () if source is None else (source,))
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(dst)
    staging = dst.parent / STAGING.format(name=dst.name, pid=os.getpid())
    staging.mkdir()  # mkdir, not mkdtemp: the directory gets the umask's mode, as any the user creates
    try:
        yield staging
        replace_with(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
