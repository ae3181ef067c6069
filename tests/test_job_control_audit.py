"""JobControl under what real use brings: a registry that fails mid-run, a checkpoint that cannot be written, a
client that gives up, a record of another host, two runs given one job id, several DDP ranks."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from forgather.callbacks import job_registry
from forgather.callbacks.job_control import ControlServer, JobControl
from forgather.cli.main import main as forgather_main
from helpers.control_train import RandomRegression, TinyRegression

HELPER = Path(__file__).parent / "helpers" / "control_train.py"


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "jobs"


def _fit(run_dir: Path, *callbacks: pl.Callback, max_steps: int = 6, **trainer_options) -> pl.Trainer:
    """A few steps of the tests' tiny regression in this process, `callbacks` in this order."""
    run_dir.mkdir(parents=True, exist_ok=True)  # the helper's module writes its pid there
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run_dir, callbacks=list(callbacks), **trainer_options,
    )
    trainer.fit(TinyRegression(0.0), DataLoader(RandomRegression(), batch_size=8))
    return trainer


class SendAt(pl.Callback):
    """Placed before JobControl: at `step`, a client thread sends `command` over the socket; the hook returns
    once the job has queued it, so JobControl acts on it at this very step."""

    def __init__(self, control: JobControl, command: str, step: int = 2, timeout: float = 20.0) -> None:
        self.control, self.command, self.step, self.timeout = control, command, step, timeout
        self.replies: list[dict] = []
        self.waited_s = 0.0
        self._thread: threading.Thread | None = None

    def _send(self, record: job_registry.JobRecord) -> None:
        start = time.monotonic()
        self.replies.append(job_registry.send_command(record, self.command, timeout=self.timeout))
        self.waited_s = time.monotonic() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self._thread is None:
            record = job_registry.resolve_job(self.control.job_id)
            self._thread = threading.Thread(target=self._send, args=(record,), daemon=True)
            self._thread.start()
            deadline = time.monotonic() + self.timeout
            while self.control._server._pending.qsize() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)

    def reply(self) -> dict:
        self._thread.join(self.timeout + 1)
        return self.replies[0]


def test_a_registry_that_fails_mid_run_does_not_end_training(registry: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The step shown by `list` is refreshed every few seconds; a full home quota must not kill the run."""
    real_write = job_registry.write_record
    writes: list[str] = []

    def full_disk(record: job_registry.JobRecord) -> Path:
        writes.append(record.job_id)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(registry / "x.tmp"))
        return real_write(record)

    monkeypatch.setattr(job_registry, "write_record", full_disk)
    trainer = _fit(tmp_path / "run", JobControl(job_id="fullhome", registry_interval_s=0.0))
    assert trainer.global_step == 6
    assert len(writes) > 2  # it kept trying
    warnings = [line for line in capsys.readouterr().err.splitlines() if "job registry" in line]
    assert warnings == [f"warning: forgather control: cannot refresh job fullhome in the job registry: "
                        f"{registry}/x.tmp: No space left on device; training goes on"]
    assert job_registry.read_records() == []


def test_an_unusable_registry_at_start_trains_without_control(tmp_path: Path, monkeypatch, capsys) -> None:
    """A read-only home (a container's HOME=/) must not stop a run: the registry is for the user's other shells."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path / "a_file" / "cache"))
    control = JobControl(job_id="nohome")
    assert _fit(tmp_path / "run", control).global_step == 6
    err = capsys.readouterr().err
    assert (f"warning: forgather control: job nohome is not registered (`forgather control` cannot reach it): "
            f"cannot use the job registry {tmp_path}/a_file/cache/jobs: Not a directory") in err
    assert control._socket_dir is not None and not control._socket_dir.exists()  # its socket was removed


def test_a_control_save_that_cannot_write_is_answered_and_training_goes_on(registry: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    for command in ("save", "stop"):
        control = JobControl(job_id=f"nodisk{command}")
        sender = SendAt(control, command)
        trainer = _fit(run_dir, sender, control)
        reply = sender.reply()
        assert trainer.global_step == 6  # neither ended by the failure nor stopped without its checkpoint
        assert reply["ok"] is False and reply["step"] == 2
        assert reply["error"].startswith(f"{command}: the checkpoint could not be written: ")
        assert reply["error"].endswith("; training goes on")
        assert f"forgather control {command} (job nodisk{command}) at step 2: the checkpoint could not be written" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("pid-")) == ["checkpoints"]


def test_a_failed_save_removes_its_partial_file(registry: Path, tmp_path: Path, monkeypatch) -> None:
    def disk_fills(self, filepath, weights_only=False, storage_options=None):
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        Path(filepath).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", disk_fills)
    control = JobControl(job_id="fills")
    sender = SendAt(control, "save")
    _fit(tmp_path / "run", sender, control)
    assert sender.reply()["ok"] is False
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_command_taken_in_a_step_that_fails_is_answered_at_once(registry: Path, tmp_path: Path, monkeypatch) -> None:
    """The client must not wait out its timeout (two minutes by default) for a job that has crashed."""
    def broken(self, filepath, weights_only=False, storage_options=None):
        raise RuntimeError("strategy failed to gather the state")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", broken)
    control = JobControl(job_id="crash")
    sender = SendAt(control, "save", timeout=30.0)
    with pytest.raises(RuntimeError, match="strategy failed"):
        _fit(tmp_path / "run", sender, control)
    reply = sender.reply()
    assert reply == {"ok": False, "error": "'save' failed: RuntimeError: strategy failed to gather the state; training ended"}
    assert sender.waited_s < 10


def _record(job_id: str, pid: int, sock: str = "/nowhere.sock", host: str | None = None) -> job_registry.JobRecord:
    return job_registry.JobRecord(job_id, pid, host or socket.gethostname(), "/runs/x", time.time(), 0, sock)


def test_a_command_the_job_does_not_answer_in_time_says_so_and_is_withdrawn(registry: Path, tmp_path: Path, capsys) -> None:
    """A job acts at the end of a step: a long validation delays it. The client's message must not say the job
    may have ended, and the command must not run later behind the user's back (an abort the user gave up on)."""
    record = _record("busy", os.getpid(), sock=str(tmp_path / "c.sock"))
    server = ControlServer(Path(record.socket), status=lambda: {"ok": True})
    server.start()
    try:
        job_registry.write_record(record)
        capsys.readouterr()
        assert forgather_main(["control", "abort", "busy", "--force", "--timeout", "0.5"]) == 1
        err = capsys.readouterr().err
        assert err == ("error: job busy did not answer 'abort' within 0.5 s (a job acts at the end of a training step; "
                       "a long step, validation or checkpoint delays it): withdrawn, unless the job had begun it; "
                       "retry with a longer --timeout\n")
        time.sleep(0.2)
        assert server.take() is None
    finally:
        server.close()


def test_a_job_of_another_host_is_named_not_dialled(registry: Path, capsys) -> None:
    """A cache on a shared home (a cluster's NFS) lists the jobs of every node; their sockets are on theirs."""
    job_registry.write_record(_record("remote", 4242, host="node17"))
    capsys.readouterr()
    assert forgather_main(["control", "status", "remote"]) == 1
    assert capsys.readouterr().err == (f"error: job remote runs on host node17, not {socket.gethostname()}: "
                                       f"run `forgather control status remote` there\n")


def test_a_job_id_held_by_a_running_job_is_refused_at_setup(registry: Path, tmp_path: Path) -> None:
    """Two runs given one job_id: the second would take over the first's record, and remove it when it ends."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        job_registry.write_record(_record("shared", other.pid))
        with pytest.raises(job_registry.JobIdTaken) as raised:
            _fit(tmp_path / "run", JobControl(job_id="shared"))
        assert str(raised.value) == (f"job id 'shared' is taken by the running job of pid {other.pid} (/runs/x): "
                                     f"give this run another job_id, or leave it unset for a random one")
        assert [(r.job_id, r.pid) for r in job_registry.read_records()] == [("shared", other.pid)]
    finally:
        other.kill()
        other.wait()
    trainer = _fit(tmp_path / "run", JobControl(job_id="shared"))  # the holder has ended: its record is replaced
    assert trainer.global_step == 6 and job_registry.read_records() == []


def test_two_processes_registering_one_id_at_once_leave_one_holder(registry: Path) -> None:
    """Four processes started together, each registering 'race' at the same instant: one wins, and the others
    are told the id is taken (the winner stays alive until the test ends)."""
    script = ("import os, socket, sys, time\n"
              "from forgather.callbacks import job_registry as r\n"
              "record = r.JobRecord('race', os.getpid(), socket.gethostname(), '/r', time.time(), 0, '/s')\n"
              "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
              "try:\n    r.register(record)\n    print('registered', flush=True)\n    time.sleep(60)\n"
              "except r.JobIdTaken:\n    print('taken', flush=True)\n")
    start = str(time.time() + 1.5)
    racers = [subprocess.Popen([sys.executable, "-c", script, start], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        outcomes = sorted(p.stdout.readline().strip() for p in racers)
        assert outcomes == ["registered", "taken", "taken", "taken"]
        assert len(job_registry.read_records()) == 1
    finally:
        for p in racers:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_failed_save_and_go_on_together(registry: Path, tmp_path: Path) -> None:
    """Only rank 0 writes a DDP checkpoint: when it fails there, every rank must carry on at the same step (a
    rank left in the checkpoint's barrier would hang the run), and a later stop must still end all ranks."""
    (tmp_path / "checkpoints").write_text("not a directory")
    job = subprocess.Popen([sys.executable, str(HELPER), "--run-dir", str(tmp_path), "--job-id", "ddpfail", "--devices", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(r.job_id == "ddpfail" for r in job_registry.read_records()):
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() is not None else "no start"
            time.sleep(0.2)
        record = job_registry.resolve_job("ddpfail")
        failed = job_registry.send_command(record, "save", timeout=30)
        assert failed["ok"] is False and "could not be written" in failed["error"]
        (tmp_path / "checkpoints").unlink()
        stopped = job_registry.send_command(record, "stop", timeout=30)
        assert stopped["ok"] is True and stopped["step"] > failed["step"]
        assert job.wait(timeout=60) == 0
        results = [json.loads((tmp_path / f"result-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert results[0] == results[1] == {"step": stopped["step"], "outcome": "finished"}
        assert Path(stopped["checkpoint"]).is_file()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_a_control_socket_that_cannot_be_opened_trains_unregistered(registry: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A Unix socket's path is limited to ~108 bytes; a scheduler's TMPDIR can be longer."""
    long_tmp = tmp_path / ("t" * 60) / ("m" * 60)
    long_tmp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    assert _fit(tmp_path / "run", JobControl(job_id="longtmp")).global_step == 6
    warning = next(line for line in capsys.readouterr().err.splitlines() if "longtmp" in line)
    assert warning.startswith(f"warning: forgather control: job longtmp is not registered (`forgather control` cannot "
                              f"reach it): {long_tmp}/forgather-")
    assert warning.endswith("/control.sock: AF_UNIX path too long")
    assert list(long_tmp.iterdir()) == [] and job_registry.read_records() == []


def test_a_pid_that_is_also_a_prefix_of_another_jobs_id_is_ambiguous(registry: Path) -> None:
    """`abort 4242` must not pick one of two jobs silently: one has PID 4242, the other an id starting 4242."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        pid = str(os.getpid())
        job_registry.write_record(_record("cafe0001", os.getpid()))
        assert job_registry.resolve_job(pid).job_id == "cafe0001"
        job_registry.write_record(_record(f"{pid}ab", other.pid))  # another job, whose id starts with this PID
        with pytest.raises(job_registry.JobNotFound) as raised:
            job_registry.resolve_job(pid)
        assert str(raised.value) == f"'{pid}' is ambiguous: it matches cafe0001, {pid}ab; give more characters"
        assert job_registry.resolve_job(f"{pid}ab").job_id == f"{pid}ab"  # a whole id is never ambiguous
    finally:
        other.kill()
        other.wait()


class SendManyAt(SendAt):
    """Placed before JobControl: at `step`, one client thread per command, all queued before JobControl acts."""

    def __init__(self, control: JobControl, commands: list[str], step: int = 2) -> None:
        super().__init__(control, "", step)
        self.commands = commands
        self.answered: list[tuple[str, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        record = job_registry.resolve_job(self.control.job_id)
        for command in self.commands:  # one at a time, so the queue's order is this list's
            queued = self.control._server._pending.qsize() + 1
            send = lambda c=command: self.answered.append((c, job_registry.send_command(record, c, timeout=20)))
            threading.Thread(target=send, daemon=True).start()
            deadline = time.monotonic() + 20
            # An action waits in the queue; a status is answered from the server thread at once.
            while (self.control._server._pending.qsize() < queued if command in job_registry.ACTIONS
                   else command not in dict(self.answered)) and time.monotonic() < deadline:
                time.sleep(0.01)

    def answers(self) -> dict[str, list[dict]]:
        """Each command's replies, in the order they came."""
        deadline = time.monotonic() + 20
        while len(self.answered) < len(self.commands) and time.monotonic() < deadline:
            time.sleep(0.01)
        return {c: [reply for command, reply in self.answered if command == c] for c in self.commands}


def test_two_saves_sent_at_once_checkpoint_two_steps(registry: Path, tmp_path: Path) -> None:
    control = JobControl(job_id="twice")
    sender = SendManyAt(control, ["save", "status", "save"])
    _fit(tmp_path / "run", sender, control)
    replies = sender.answers()
    assert [reply["ok"] for reply in replies["status"]] == [True]
    assert sorted((reply["ok"], reply["step"]) for reply in replies["save"]) == [(True, 2), (True, 3)]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["control-step2.ckpt", "control-step3.ckpt"]


def test_a_save_queued_behind_a_stop_is_told_training_ended(registry: Path, tmp_path: Path) -> None:
    control = JobControl(job_id="stopsave")
    sender = SendManyAt(control, ["stop", "save"])
    trainer = _fit(tmp_path / "run", sender, control, max_steps=20)
    replies = sender.answers()
    assert trainer.global_step == 2
    assert replies["stop"] == [{"ok": True, "command": "stop", "step": 2,
                                "checkpoint": str(tmp_path / "run" / "checkpoints" / "control-step2.ckpt")}]
    assert replies["save"] == [{"ok": False, "error": "training ended before 'save' ran"}]


def test_an_abort_behind_a_save_keeps_the_checkpoint_and_the_run_resumes_from_it(registry: Path, tmp_path: Path) -> None:
    from forgather.callbacks.job_control import JobAborted
    from forgather.run import latest_checkpoint

    control = JobControl(job_id="saveabort")
    sender = SendManyAt(control, ["save", "abort"])
    with pytest.raises(JobAborted):
        _fit(tmp_path / "run", sender, control, max_steps=20)
    replies = sender.answers()
    assert replies["save"][0]["step"] == 2 and replies["abort"] == [{"ok": True, "command": "abort", "step": 3}]
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint == tmp_path / "run" / "checkpoints" / "control-step2.ckpt"
    resumed = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run")
    resumed.fit(TinyRegression(0.0), DataLoader(RandomRegression(), batch_size=8), ckpt_path=checkpoint)
    assert resumed.global_step == 4


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        forgather_main(["control", "status", "anyjob", "--timeout", value])
    assert raised.value.code == 2
    assert f"argument --timeout: expected a positive number of seconds, got '{value}'" in capsys.readouterr().err


def test_an_action_whose_client_went_away_is_withdrawn(tmp_path: Path) -> None:
    """Ctrl-C on `forgather control abort` while the job is in a long validation: the abort must not run later."""
    path = tmp_path / "c.sock"
    server = ControlServer(path, status=lambda: {"ok": True})
    server.start()
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        job_registry.send_message(client, {"command": "abort", "timeout": 120})
        deadline = time.monotonic() + 10
        while server._pending.qsize() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server._pending.qsize() == 1
        client.close()
        time.sleep(0.1)
        assert server.take() is None
    finally:
        server.close()


def test_a_client_still_waiting_gets_its_action_taken(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = ControlServer(path, status=lambda: {"ok": True})
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            job_registry.send_message(client, {"command": "save", "timeout": 120})
            deadline = time.monotonic() + 10
            while (pending := server.take()) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pending is not None and pending.name == "save"
            pending.finish({"ok": True, "command": "save", "step": 1})
            assert job_registry.receive_message(client) == {"ok": True, "command": "save", "step": 1}
    finally:
        server.close()


@pytest.mark.slow
def test_a_status_to_a_job_that_never_answers_gives_up_in_15_s(registry: Path, tmp_path: Path, capsys) -> None:
    """A suspended job (Ctrl-Z, a stopped container) accepts the connection in the kernel and never replies."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(tmp_path / "c.sock"))
        listening.listen()
        job_registry.write_record(_record("frozen", os.getpid(), sock=str(tmp_path / "c.sock")))
        capsys.readouterr()
        start = time.monotonic()
        assert forgather_main(["control", "status", "frozen"]) == 1
        assert time.monotonic() - start < 20
    assert capsys.readouterr().err == ("error: job frozen did not answer 'status' within 15 s "
                                       "(its process may be suspended or overloaded)\n")


def test_a_stop_before_the_trainers_minimum_says_training_goes_on_to_it(registry: Path, tmp_path: Path, capsys) -> None:
    """Lightning trains on to min_steps after a stop (min_epochs=0: Lightning makes it 1 when only min_steps is
    given): the client and the log were told that training ends."""
    control = JobControl(job_id="minsteps")
    sender = SendAt(control, "stop")
    trainer = _fit(tmp_path / "run", sender, control, max_steps=8, min_steps=5, min_epochs=0)
    reply = sender.reply()
    assert trainer.global_step == 5
    assert reply["ok"] is True and reply["note"] == "training ends at min_steps=5, the Trainer's minimum"
    assert "at step 2: checkpoint saved, training ends at min_steps=5, the Trainer's minimum" in capsys.readouterr().out
