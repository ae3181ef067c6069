"""Start the processes of a distributed test script side by side, as torchrun would, and wait for them.

Each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo's
`init_process_group()` reads it, and Lightning then runs on processes it did not start. Started together, the
ranks import torch at once; a spawning parent (torch.multiprocessing.spawn, Lightning's launcher) imports it
alone first and starts the ranks after, which doubles a two-rank test's start-up on a small machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time

from forgather.ports import free_port


def start(arguments: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python *arguments`, its output kept for `wait_all` to show if it fails."""
    output = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, *arguments], env={**os.environ, **(env or {})}, stdout=output,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    process.output = output
    return process


def start_ranks(arguments: list[str], world_size: int) -> list[subprocess.Popen]:
    """`python *arguments` once a rank, all on this host."""
    common = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "NODE_RANK": "0"}
    return [start(arguments, {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(world_size)]


def wait_all(processes: list[subprocess.Popen], timeout: float = 300) -> None:
    """Wait for every process; when one fails or time runs out, stop the rest (a rank left alone would wait
    at its next collective until gloo's timeout) and raise with the failed one's output."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            failed = next((p for p in processes if p.poll() not in (None, 0)), None)
            if failed is not None:
                raise AssertionError(_report(failed, f"exited with {failed.returncode}"))
            running = [p for p in processes if p.returncode is None]
            if not running:
                return
            if time.monotonic() > deadline:
                raise AssertionError(_report(running[0], f"ran past {timeout} s"))
            time.sleep(0.05)
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            process.output.close()


def failed_outputs(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Every process's output, once each has failed (a test of an error every rank raises)."""
    outputs = []
    try:
        for process in processes:
            assert process.wait(timeout=timeout) != 0
            process.output.seek(0)
            outputs.append(process.output.read().decode(errors="replace"))
    finally:
        for process in processes:
            process.kill()
            process.wait()
            process.output.close()
    return outputs


def _report(process: subprocess.Popen, why: str) -> str:
    process.output.seek(0)
    return f"{' '.join(process.args)} {why}:\n{process.output.read().decode(errors='replace')}"
