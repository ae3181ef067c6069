"""One process trains in a run directory at a time, one session runs a sweep: forgather.run_lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgather.run import main
from forgather.run_lock import LOCK_FILE, DirectoryInUse, hold
from test_run import run, run_dirs

MICRO = ("+experiment=micro", "scheduler=constant")

_HOLDER = """
import sys, time
from forgather.run_lock import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_names_its_holder_and_a_killed_holder_leaves_none(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUse, match=rf"^{tmp_path}: a run trains in it now \(pid {holder.pid} on "):
            with hold(tmp_path):
                pass
        holder.send_signal(signal.SIGKILL)  # no handler runs: the kernel drops the lock
        holder.wait()
        with hold(tmp_path):
            assert (tmp_path / LOCK_FILE).read_text().startswith(f'{{"pid": {os.getpid()}, ')
    finally:
        holder.kill()
        holder.wait()


def test_resuming_a_run_that_another_process_trains_is_one_line_and_changes_nothing(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=4") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    rows = (run_dir / "csv" / "metrics.csv").read_text()
    capsys.readouterr()
    with hold(run_dir):  # as the process training it would
        assert main(["--resume", str(run_dir), "max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}: a run trains in it now (pid {os.getpid()} on ")
    assert err.endswith("; wait for it to end, or stop it first (forgather control list / stop JOB)\n")
    assert (run_dir / "csv" / "metrics.csv").read_text() == rows
    assert main(["--resume", str(run_dir), "max_steps=8"]) == 0, "the lock ends with its holder"


def test_resuming_a_sweep_that_another_session_runs_is_refused_before_any_point_starts(tmp_path, capsys):
    assert run(tmp_path, "-m", *MICRO, "max_steps=2", "lr=1e-3,3e-3") == 0
    (root,) = (tmp_path / "multirun").iterdir()
    (root / "1" / "outcome.json").unlink()  # as a killed session would leave it
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    capsys.readouterr()
    with hold(root, "a sweep runs"):
        assert main(["--resume", str(root)]) == 2
    assert f"error: {root}: a sweep runs in it now (pid {os.getpid()} on " in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "no point started over"
