"""One process trains in a run directory at a time (and one session runs a sweep directory).

The first rank of a run holds an exclusive `flock` on `<dir>/.lock` from before it builds the run until the
run ends. The kernel drops the lock when the process ends, however it ends (a kill -9 included), so a lock
is never stale: that is why this is a lock and not a PID file, which a killed process leaves behind and a
new one cannot tell from a live one's. A second process that would write into the same directory (a
`--resume` typed twice, a scheduler requeueing a job that still runs, a sweep resumed from two shells)
fails at once with one line naming the holder, which the holder wrote into the file (pid, host, start time).
Without it the two would interleave their checkpoints and metrics rows, and a resumed sweep would delete the
directory of a point that another session is training.

The file is left in place when the run ends (unlinking it could let two processes lock two different files
of the same name). Where the file system does not support locks (some network file systems), the run goes
on unlocked: the lock guards against a mistake, it is not needed to train.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from forgather.errors import UserError

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class DirectoryInUse(UserError):
    """Another live process holds the directory's lock."""


def first_rank() -> bool:
    """Whether this process is a run's first rank: not a rank that Lightning, torchrun or SLURM started beside
    it (they set RANK, LOCAL_RANK or NODE_RANK to a non-zero value)."""
    return not any(int(os.environ.get(name, "0") or 0) for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def hold(directory: str | os.PathLike, what: str = "a run trains",
         hint: str = "wait for it to end, or stop it first (forgather control list / stop JOB)") -> Iterator[None]:
    """Hold `directory`'s lock (on the first rank only) for the duration; DirectoryInUse if another process
    holds it. `what` says what the holder does there and `hint` what to do, for the message."""
    if not first_rank():
        yield
        return
    directory = Path(directory)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryInUse(f"{directory}: {what} in it now ({_holder(fd)}); {hint}") from None
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            yield  # no locks on this file system
            return
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']} on {record['host']}, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
