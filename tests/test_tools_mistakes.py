"""The project tools (`forgather new`, `tb`, `control`) answer a user's mistake with one line, never a
traceback, and never act on what is not theirs: a stale job record is not a running job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from forgather.callbacks import job_registry
from forgather.cli import tb
from forgather.cli.main import main as forgather_main


def _record(job_id: str, pid: int, start_time: float | None = None) -> job_registry.JobRecord:
    start = time.time() if start_time is None else start_time
    return job_registry.JobRecord(job_id, pid, socket.gethostname(), "/nowhere", start, 0, "/nowhere.sock")


@pytest.fixture
def registry(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path / "cache"))
    return job_registry.jobs_dir()


def test_a_damaged_record_is_skipped_and_cleanup_removes_it(registry: Path, capsys) -> None:
    job_registry.write_record(_record("alive", os.getpid()))
    (registry / "weird.json").write_text(json.dumps(
        {"job_id": "weird", "pid": "abc", "host": "h", "run_dir": 1, "start_time": "x", "step": None, "socket": None}))
    (registry / "truncated.json").write_text('{"job_id": "trunc", "pid": 1')
    left_by_a_killed_writer = registry / ".gone.x1.tmp"
    left_by_a_killed_writer.write_text("{")
    os.utime(left_by_a_killed_writer, (time.time() - 3600, time.time() - 3600))
    (registry / ".writing.x2.tmp").write_text("{")  # a writer at work now
    assert [r.job_id for r in job_registry.list_jobs()] == ["alive"]
    assert sorted(p.name for p in registry.iterdir()) == [".gone.x1.tmp", ".writing.x2.tmp", "alive.json",
                                                          "truncated.json", "weird.json"]
    assert forgather_main(["control", "cleanup"]) == 0
    assert capsys.readouterr().out == "removed 0 entries of ended jobs and 3 damaged ones; 1 running\n"
    assert sorted(p.name for p in registry.iterdir()) == [".writing.x2.tmp", "alive.json"]


def test_a_record_whose_pid_now_belongs_to_a_later_process_is_not_a_running_job(registry: Path) -> None:
    later = subprocess.Popen(["sleep", "30"])
    try:
        job_registry.write_record(_record("ended", later.pid, start_time=time.time() - 3600))
        job_registry.write_record(_record("running", os.getpid()))
        assert [r.job_id for r in job_registry.list_jobs()] == ["running"]
        with pytest.raises(job_registry.JobNotFound, match="no running job"):
            job_registry.resolve_job(str(later.pid))  # the PID that `list` showed for the ended job
    finally:
        later.kill()
        later.wait()


def test_control_list_json_is_the_records_of_the_running_jobs(registry: Path, capsys) -> None:
    job_registry.write_record(_record("alive", os.getpid()))
    assert forgather_main(["control", "list", "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [(job["job_id"], job["pid"]) for job in jobs] == [("alive", os.getpid())]


def test_new_under_a_file_is_one_line_and_creates_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert forgather_main(["new", str(tmp_path / "notes.txt" / "lm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "is a file" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_new_shows_a_cd_a_shell_can_run_for_a_name_with_spaces(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert forgather_main(["new", "my lm"]) == 0
    assert "  cd 'my lm'\n" in capsys.readouterr().out


def test_tb_on_a_busy_port_is_one_line_before_tensorboard_starts(tmp_path: Path, capsys, monkeypatch) -> None:
    started = []
    monkeypatch.setattr(tb, "run_forwarding_signals", lambda argv: started.append(argv) or 0)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert forgather_main(["tb", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: forgather tb: port {port} is in use (another TensorBoard?); "
                       "pass another --port, or stop what holds it")
    assert started == []


def test_tb_refuses_a_port_out_of_range(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        forgather_main(["tb", str(tmp_path), "--port", "99999", "--dry-run"])
    assert exit_.value.code == 2
    assert "'99999' is not a port: give a number from 0 to 65535" in capsys.readouterr().err
