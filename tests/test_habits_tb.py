"""`forgather tb` never leaves TensorBoard running: signals that end the command reach TensorBoard, and the
command waits for it. TensorBoard is a stand-in module (`python -m tensorboard.main` finds it first on
PYTHONPATH) that records the signal it got and takes a moment to shut down, as the real one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKE_MAIN = """
import os, signal, sys, time
from pathlib import Path

out = Path(os.environ["FAKE_TB_DIR"])

def stop(signum, frame):
    time.sleep(0.5)  # shutting down takes a moment: the parent must wait for it
    (out / "signal").write_text(signal.Signals(signum).name)
    sys.exit(0)

for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, stop)
(out / "pid.partial").write_text(str(os.getpid()))
(out / "pid.partial").rename(out / "pid")  # whole when it appears: the test reads it as soon as it exists
while True:
    time.sleep(0.1)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) still answers kill(0): ask /proc.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_forgather_tb_reaches_tensorboard_and_is_waited_for(tmp_path, signum):
    fake = tmp_path / "fake" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "main.py").write_text(FAKE_MAIN)
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAKE_TB_DIR": str(tmp_path)}
    command = subprocess.Popen([sys.executable, "-m", "forgather", "-p", str(tmp_path), "tb", "--port", "0"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists():
            assert command.poll() is None and time.monotonic() < deadline, "the stand-in TensorBoard did not start"
            time.sleep(0.05)
        tensorboard = int((tmp_path / "pid").read_text())
        command.send_signal(signum)
        status = command.wait(timeout=30)
        # When the command has ended, TensorBoard has ended too, having got the same signal.
        assert not _alive(tensorboard)
        assert (tmp_path / "signal").read_text() == signal.Signals(signum).name
        assert status == 0  # TensorBoard's own status (it shut down cleanly)
    finally:
        command.kill()
        if (tmp_path / "pid").exists() and _alive(pid := int((tmp_path / "pid").read_text())):
            os.kill(pid, signal.SIGKILL)


def test_a_missing_log_directory_is_one_line_before_tensorboard_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "forgather", "-p", str(tmp_path), "tb", str(tmp_path / "outptus")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "outptus is not a directory; give a directory of runs" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_directory_without_logs_warns_and_tensorboard_still_starts(tmp_path, capsys):
    """TensorBoard serves a directory without event files as an empty page, without a word."""
    from forgather.cli.main import main

    (tmp_path / "runs").mkdir()
    assert main(["-p", str(tmp_path), "tb", str(tmp_path / "runs"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "-m tensorboard.main --logdir" in captured.out
    assert captured.err == (f"warning: no TensorBoard logs under {tmp_path / 'runs'} yet (a run writes them to "
                            "<run directory>/tb/); pass the directory of your runs, or -p PROJECT\n")
    (tmp_path / "runs" / "a" / "tb").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    assert main(["-p", str(tmp_path), "tb", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert capsys.readouterr().err == ""
