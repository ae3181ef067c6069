"""Kill a process with SIGKILL at a chosen moment: the kill -9 tests of runs, prepares and sweeps."""

import contextlib
import os
import signal
import subprocess
import time
from typing import Callable


def kill_when(child: subprocess.Popen, ready: Callable[[], bool], timeout: float, too_soon: str, group: bool = False) -> list[int]:
    """SIGKILL `child` as soon as `ready()` holds (its whole process group with `group`: start it with
    start_new_session=True); fail with `too_soon` if it ends first or `timeout` seconds pass. Whatever
    happens, the process (group) is dead and reaped on return. Returns the child's own children as they were
    when it was killed (Linux), which outlive it unless they notice (see `alive`)."""
    kill = os.killpg if group else os.kill
    orphans: list[int] = []
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert child.poll() is None and time.monotonic() < deadline, too_soon
            time.sleep(0.02)
        orphans = _children(child.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone
            kill(child.pid, signal.SIGKILL)
        child.wait()
    return orphans


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name: state, ppid, ...; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pids: list[int], within: float) -> list[int]:
    """Those of `pids` still running (not gone, not a zombie) after waiting up to `within` seconds for all."""
    deadline = time.monotonic() + within
    while True:
        running = [pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)
