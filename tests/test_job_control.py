"""JobControl + `forgather control`: a real training subprocess driven through every command."""

import io
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from forgather.callbacks import job_registry
from forgather.callbacks.job_control import ControlServer, JobControl
from forgather.cli.main import main as forgather_main
from forgather.lightning.module import CausalLMModule
from helpers.tiny_lm import tiny_model, toy_loader

HELPER = Path(__file__).parent / "helpers" / "control_train.py"
STARTUP_TIMEOUT_S = 60.0


class Job:
    """A training subprocess registered under `job_id`."""

    def __init__(self, run_dir: Path, job_id: str, devices: int = 1) -> None:
        self.run_dir = run_dir
        self.job_id = job_id
        command = [sys.executable, str(HELPER), "--run-dir", str(run_dir), "--job-id", job_id]
        self.process = subprocess.Popen(command + ["--devices", str(devices)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait_until_training()

    def _wait_until_training(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"training subprocess died:\n{self.process.stderr.read()}")
            record = next((r for r in job_registry.read_records() if r.job_id == self.job_id), None)
            # A few steps in, so the step time (and with it the ETA) is measured.
            if record is not None and job_registry.send_command(record, "status", timeout=10)["step"] >= 3:
                return
            time.sleep(0.2)
        raise TimeoutError("training subprocess did not start stepping in time")

    def step_passes(self, step: int, timeout_s: float = 20.0) -> bool:
        """Whether training gets beyond `step` within the timeout."""
        record = job_registry.resolve_job(self.job_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if job_registry.send_command(record, "status", timeout=10)["step"] > step:
                return True
            time.sleep(0.1)
        return False

    def wait(self) -> int:
        return self.process.wait(timeout=60)

    def output(self) -> str:
        """What the job printed to stdout (its log), once it has ended."""
        self.wait()
        return self.process.stdout.read()

    def checkpoints(self) -> list[Path]:
        return sorted(self.run_dir.rglob("*.ckpt"))

    def result(self, rank: int = 0) -> dict:
        return json.loads((self.run_dir / f"result-rank{rank}.json").read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run `forgather control ARGV` in-process through the `forgather` entry point; (exit code, stdout)."""
    capsys.readouterr()
    code = forgather_main(["control", *argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private registry for this module's jobs; subprocesses inherit it through the environment."""
    path = tmp_path_factory.mktemp("cache")
    previous = os.environ.get(job_registry.CACHE_ENV)
    os.environ[job_registry.CACHE_ENV] = str(path)
    yield path
    if previous is None:
        del os.environ[job_registry.CACHE_ENV]
    else:
        os.environ[job_registry.CACHE_ENV] = previous


@pytest.fixture(scope="module")
def running_job(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One long-running job shared by the tests that leave it running."""
    job = Job(tmp_path_factory.mktemp("run"), "shared0job")
    yield job
    job.kill()


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def test_list_shows_running_job(running_job: Job, capsys, wide_console) -> None:
    code, out = cli(capsys, "list")
    assert code == 0
    assert running_job.job_id in out
    assert str(running_job.process.pid) in out


def test_status_reports_step_loss_and_eta(running_job: Job, capsys) -> None:
    code, out = cli(capsys, "status", "shared0", "--json")
    reply = json.loads(out)
    assert code == 0
    assert reply["step"] > 0
    assert isinstance(reply["loss"], float)
    assert 0 < reply["eta_s"] < float("inf")
    assert reply["max_steps"] == 100_000


def test_control_socket_is_private(running_job: Job) -> None:
    record = job_registry.resolve_job(running_job.job_id)
    socket_path = Path(record.socket)
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700


def test_save_writes_checkpoint_and_training_continues(running_job: Job, capsys) -> None:
    code, out = cli(capsys, "save", running_job.job_id, "--json")
    reply = json.loads(out)
    assert code == 0
    assert Path(reply["checkpoint"]).is_file()
    assert Path(reply["checkpoint"]).name == f"control-step{reply['step']}.ckpt"
    assert [p.name for p in Path(reply["checkpoint"]).parent.iterdir()] == [f"control-step{reply['step']}.ckpt"]
    assert running_job.step_passes(reply["step"])
    assert running_job.process.poll() is None


def test_stop_saves_checkpoint_and_exits_zero(cache_dir: Path, tmp_path: Path, capsys) -> None:
    job = Job(tmp_path, "stop0job")
    try:
        code, out = cli(capsys, "stop", "stop0", "--json")
        reply = json.loads(out)
        assert code == 0
        assert job.wait() == 0
        assert Path(reply["checkpoint"]).is_file()
        assert job.result() == {"step": reply["step"], "outcome": "finished"}
    finally:
        job.kill()


def test_save_and_stop_are_logged_in_the_runs_own_output(cache_dir: Path, tmp_path: Path, capsys) -> None:
    job = Job(tmp_path, "log0job")
    try:
        _, out = cli(capsys, "save", "log0", "--json")
        saved = json.loads(out)
        _, out = cli(capsys, "stop", "log0", "--json")
        stopped = json.loads(out)
        log = job.output()
        assert f"forgather control save (job log0job) at step {saved['step']}: checkpoint saved, training goes on: {saved['checkpoint']}\n" in log
        assert f"forgather control stop (job log0job) at step {stopped['step']}: checkpoint saved, training ends: {stopped['checkpoint']}\n" in log
    finally:
        job.kill()


def test_status_takes_the_pid_that_list_shows(running_job: Job, capsys) -> None:
    code, out = cli(capsys, "status", str(running_job.process.pid), "--json")
    assert code == 0 and json.loads(out)["job_id"] == running_job.job_id


def test_list_with_an_unusable_cache_dir_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    env = {**os.environ, job_registry.CACHE_ENV: str(tmp_path / "a_file" / "cache")}
    result = subprocess.run([sys.executable, "-m", "forgather", "control", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"error: cannot use the job registry {tmp_path}/a_file/cache/jobs: Not a directory (fix its permissions, or point ${job_registry.CACHE_ENV} at a directory of your own)\n"


def test_list_with_an_unreadable_registry_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    # Permission bits do not stop root (the test box's user): the refusal is the kernel's answer, simulated.
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path))
    real_listdir = os.listdir

    def refuse(path):
        if Path(path) == tmp_path / "jobs":
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)
    assert forgather_main(["control", "list"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: cannot use the job registry {tmp_path}/jobs: Permission denied (fix its permissions, or point ${job_registry.CACHE_ENV} at a directory of your own)\n"


def test_abort_exits_without_checkpoint(cache_dir: Path, tmp_path: Path, capsys) -> None:
    job = Job(tmp_path, "abort0job")
    try:
        code, _ = cli(capsys, "abort", "abort0")
        assert code == 0
        assert job.wait() == 3
        assert job.result()["outcome"] == "aborted"
        assert "forgather control abort (job abort0job) at step" in job.output()
        assert job.checkpoints() == []
    finally:
        job.kill()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _record(job_id: str, pid: int) -> job_registry.JobRecord:
    return job_registry.JobRecord(job_id, pid, socket.gethostname(), "/nowhere", time.time(), 0, "/nowhere.sock")


def test_list_removes_entries_of_dead_processes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path))
    job_registry.write_record(_record("dead", _dead_pid()))
    job_registry.write_record(_record("alive", os.getpid()))
    assert [r.job_id for r in job_registry.list_jobs()] == ["alive"]
    assert [r.job_id for r in job_registry.read_records()] == ["alive"]


def test_prefix_must_match_one_job(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path))
    job_registry.write_record(_record("abc1", os.getpid()))
    job_registry.write_record(_record("abc2", os.getpid()))
    assert job_registry.resolve_job("abc2").job_id == "abc2"
    with pytest.raises(job_registry.JobNotFound, match="ambiguous"):
        job_registry.resolve_job("abc")
    with pytest.raises(job_registry.JobNotFound, match="no running job"):
        job_registry.resolve_job("zzz")


def test_a_job_not_found_or_not_answering_is_one_error_line_on_stderr(tmp_path: Path, monkeypatch, capsys) -> None:
    """Both were printed in red on stdout, wrapped at the terminal's width, without `error: `."""
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path))
    job_registry.write_record(_record("silent", os.getpid()))  # registered, alive, but no socket answers
    capsys.readouterr()
    assert forgather_main(["control", "stop", "a-job-id-long-enough-to-be-wrapped-by-a-narrow-terminal"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "error: no running job has the id, PID or id prefix 'a-job-id-long-enough-to-be-wrapped-by-a-narrow-terminal' "
        "(see `forgather control list`)\n")
    assert forgather_main(["control", "status", "sil"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: could not reach job silent: ")
    assert captured.err.endswith("; it may have just ended (see `forgather control list`)\n")


def test_peer_check_refuses_another_uid() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert job_registry.peer_uid(left) == os.getuid()
        assert job_registry.peer_allowed(left, owner_uid=os.getuid())
        assert not job_registry.peer_allowed(left, owner_uid=os.getuid() + 1)


def test_server_refuses_a_foreign_uid(tmp_path: Path) -> None:
    record = _record("foreign", os.getpid())
    record.socket = str(tmp_path / "c.sock")
    server = ControlServer(Path(record.socket), status=lambda: {"ok": True}, owner_uid=os.getuid() + 1)
    server.start()
    try:
        reply = job_registry.send_command(record, "status", timeout=5)
    finally:
        server.close()
    assert reply["ok"] is False
    assert "refused" in reply["error"]


class StatusProbe(pl.Callback):
    """A callback (placed after JobControl) that asks for status from inside training at one step."""

    def __init__(self, job_id: str, at_step: int) -> None:
        super().__init__()
        self.job_id, self.at_step = job_id, at_step
        self.reply: dict = {}
        self.socket = ""
        self.loss = math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            record = job_registry.resolve_job(self.job_id)
            self.socket = record.socket
            self.reply = job_registry.send_command(record, "status", timeout=10)
            self.loss = float(trainer.callback_metrics["train/loss"])


def test_status_reports_causal_lm_module_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path / "cache"))
    torch.set_num_threads(1)
    probe = StatusProbe("inproc", at_step=3)
    # Metrics are read on logged steps (or when a status request asks, served at the next step's end: this
    # probe blocks the training thread, so it relies on step 3 being logged).
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, log_every_n_steps=1, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[JobControl(job_id="inproc"), probe],
    )
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(4))
    assert probe.reply["step"] == 3
    assert probe.reply["loss"] == pytest.approx(probe.loss)
    assert probe.reply["tokens_per_s"] > 0
    assert probe.reply["max_steps"] == 4


def test_finished_job_leaves_the_registry(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path / "cache"))
    probe = StatusProbe("done", at_step=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[JobControl(job_id="done"), probe],
    )
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(2))
    assert probe.reply["job_id"] == "done"
    assert job_registry.read_records() == []
    assert not Path(probe.socket).exists()


def test_ddp_ranks_stop_at_the_same_step(cache_dir: Path, tmp_path: Path, capsys) -> None:
    job = Job(tmp_path, "ddp0job", devices=2)
    try:
        code, out = cli(capsys, "stop", "ddp0", "--json")
        reply = json.loads(out)
        assert code == 0
        assert job.wait() == 0
        assert job.result(0)["step"] == job.result(1)["step"] == reply["step"]
        assert Path(reply["checkpoint"]).is_file()
    finally:
        job.kill()


@pytest.mark.parametrize("devices, rank", [(1, 0), (2, 0), (2, 1)], ids=["one process", "ddp rank 0", "ddp rank 1"])
def test_sigterm_to_one_rank_checkpoints_every_rank_at_one_step_and_exits_143(cache_dir: Path, tmp_path: Path, devices: int, rank: int) -> None:
    # With Lightning's launcher rank 0 is the process started; the other ranks never receive its signal.
    job = Job(tmp_path, f"term{devices}r{rank}job", devices=devices)
    try:
        os.kill(int((tmp_path / f"pid-rank{rank}").read_text()), signal.SIGTERM)
        assert job.wait() == 128 + signal.SIGTERM
        results = [job.result(rank) for rank in range(devices)]
        step = results[0]["step"]
        checkpoint = tmp_path / "checkpoints" / f"control-step{step}.ckpt"
        assert all(r == {"step": step, "outcome": f"stopped: {checkpoint}"} for r in results)
        assert torch.load(checkpoint, weights_only=False)["global_step"] == step
        assert checkpoint in job.checkpoints()  # beside Lightning's own of the epoch that ends
        assert f"SIGTERM at step {step}: checkpoint saved: {checkpoint} (job term{devices}r{rank}job), training ends\n" in job.output()
    finally:
        job.kill()


def test_a_stop_is_reported_by_rank_0_alone():
    from forgather.callbacks.job_control import JobStopped
    from forgather.errors import report

    for rank, lines in ((0, 1), (1, 0)):
        stream = io.StringIO()
        assert report(JobStopped(signal.SIGTERM, 7, Path("/run/last.ckpt"), Path("/run"), rank), stream) == 143
        assert stream.getvalue().count("stopped: SIGTERM at step 7: checkpoint saved: /run/last.ckpt") == lines


_TWICE = """
import signal, sys
from forgather.callbacks.job_control import JobControl
control = JobControl()
control._catch_signals()
signal.raise_signal(signal.{name})
print("marked:", control._signalled == signal.{name}, flush=True)
try:
    signal.raise_signal(signal.{name})
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    print("restored:", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
    sys.exit(130)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("name, code, last", [("SIGTERM", -signal.SIGTERM, "marked: True"), ("SIGINT", 130, "restored: True")])
def test_a_second_stop_signal_stops_at_once(name: str, code: int, last: str) -> None:
    """The first arrival only marks the job; the second ends it the way the signal ends a process without
    handlers: SIGTERM's default action, Ctrl-C's KeyboardInterrupt (the handlers put back first)."""
    result = subprocess.run([sys.executable, "-c", _TWICE.format(name=name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stdout.strip().splitlines()[-1] == last
    assert f"{name}: saving a checkpoint at the end of this step, then stopping ({name} again stops at once, nothing saved)" in result.stderr


class _Terminal(io.StringIO):
    """stdin as a terminal the user typed `answer` into."""

    def isatty(self) -> bool:
        return True


def test_abort_asks_at_a_terminal_and_no_keeps_the_job_running(running_job: Job, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, _ = cli(capsys, "abort", "shared0")
    assert code == 1
    code, out = cli(capsys, "status", "shared0")  # still training
    assert code == 0 and "job shared0job  step" in out
    sent = []
    monkeypatch.setattr(job_registry, "send_command", lambda record, command, timeout: sent.append(command) or {"ok": True, "step": 1})
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    assert cli(capsys, "abort", "shared0")[0] == 0 and sent == ["abort"]
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    assert cli(capsys, "abort", "--force", "shared0")[0] == 0 and sent == ["abort", "abort"]  # -f: nothing asked
    assert cli(capsys, "save-stop", "shared0")[0] == 0 and sent[-1] == "stop"  # the reference's name for stop


def test_cleanup_removes_entries_of_ended_jobs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path))
    job_registry.write_record(_record("dead", _dead_pid()))
    job_registry.write_record(_record("alive", os.getpid()))
    code, out = cli(capsys, "cleanup", "--force")
    assert code == 0 and out == "removed 1 entries of ended jobs; 1 running\n"
    assert [r.job_id for r in job_registry.read_records()] == ["alive"]
