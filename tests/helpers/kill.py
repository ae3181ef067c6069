"""Kill a process with SIGKILL at a chosen moment: the kill -9 tests of runs, prepares and sweeps."""

import contextlib
import os
import signal
import subprocess
import time
from typing import Callable


def kill_when(child: subprocess.Popen, ready: Callable[[], bool], timeout: float, too_soon: str, group: bool = False) -> None:
    """SIGKILL `child` as soon as `ready()` holds (its whole process group with `group`: start it with
    start_new_session=True); fail with `too_soon` if it ends first or `timeout` seconds pass. Whatever
    happens, the process (group) is dead and reaped on return."""
    kill = os.killpg if group else os.kill
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert child.poll() is None and time.monotonic() < deadline, too_soon
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone
            kill(child.pid, signal.SIGKILL)
        child.wait()
