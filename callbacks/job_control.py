"""`JobControl`: a running job answers `forgather control` (status, save, stop, abort).

Rank 0 registers the job (`forgather.callbacks.job_registry`) and serves a Unix socket (directory 0700,
socket 0600, peers of another uid refused) from a background thread. `status` is answered at once from the
last step's numbers; `save`/`stop`/`abort` are queued, and at the end of an optimizer step the ranks agree on
the pending one (an int, all-reduced) so every rank acts at the same step:
- save: `trainer.save_checkpoint` to a hidden name, renamed by rank 0 to
  `<run_dir>/checkpoints/control-step<N>.ckpt`, and training goes on;
- stop: the same checkpoint, then `trainer.should_stop = True` (a clean end of `fit`);
- abort: raises `JobAborted` from the hook: nothing is saved and `trainer.fit` re-raises it, so the caller
  decides the exit code.
Rank 0 prints each action it carries out (and the checkpoint's path) to the run's stdout, its log. A checkpoint
that cannot be written (a full disk) fails the command, not the run: every rank goes on training, a stop
included, and the client is told why. An action still queued when its client stops waiting (its timeout
passed, or Ctrl-C) is withdrawn; one taken in a step that then fails is answered with the failure, so no
client waits for a job that has ended.
The registry is for the user's other shells: where it or the socket cannot be used (a read-only home, a
TMPDIR too long for a socket's path), the run trains unregistered, with a warning; a job id another running
job holds is refused at setup (`JobIdTaken`).

A stop signal (`stop_signals`: SIGTERM, SIGINT and SIGUSR2 by default) is a stop that cannot wait for a client:
while training runs, its first arrival only marks the job; at the end of the optimizer step fit ends as for
a stop, with this step's checkpoint (our ModelCheckpoint's `last.ckpt` where the trainer has one, else the
job's own), and `on_train_end` raises `JobStopped` (the run was interrupted, not finished: nothing is
exported, and a sweep point counts as not done). SIGTERM is what a scheduler, `kill`, `docker
stop` or a sweep's launcher sends before it kills; SIGINT is Ctrl-C; SIGUSR2 is the warning submitit has SLURM
send before a time limit (its default action would end the process at once). Without this, Lightning stops at the next
batch on SIGTERM and on Ctrl-C, saving nothing, and the steps since the last periodic checkpoint are lost.
A second arrival of the same signal stops at once, nothing saved (the default action of SIGTERM, a
KeyboardInterrupt for SIGINT). The signal may reach any rank, or all of them (torchrun, srun and a terminal's
Ctrl-C reach every rank; `kill` one process): the ranks agree at the step's end, and all stop together.
Handlers are set on the main thread only, from `on_train_start` to `on_train_end`, so a signal during setup or after the last step keeps Lightning's handling.
Hooks: setup, on_train_start, on_train_batch_end, on_train_end, teardown, on_exception.
"""

from __future__ import annotations

import atexit
import collections
import os
import queue
import secrets
import select
import shutil
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch

from forgather.callbacks import job_registry
from forgather.callbacks.job_registry import JobRecord
from forgather.lightning.checkpoint_io import remove_quietly
from forgather.lightning.steps import writes_metrics

# The wire code of each action in the per-step agreement of the ranks; 0 means "nothing to do".
_ACTION_CODES = {name: code for code, name in enumerate(job_registry.ACTIONS, start=1)}
_ACTION_NAMES = {code: name for name, code in _ACTION_CODES.items()}
# A stop signal travels in the same agreement as this offset plus its number (above every action's code).
_SIGNAL_CODE = 64
# How long rank 0 lingers after acting so the reply leaves before the process may exit.
_REPLY_GRACE_S = 2.0
_IO_TIMEOUT_S = 30.0
# How long `status` waits for the training thread to read the current metrics.
_STATUS_WAIT_S = 2.0


class JobAborted(Exception):
    """Raised on every rank when `forgather control abort` reaches the job; nothing was saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"job aborted by `forgather control abort` at step {step}")
        self.step = step


class JobStopped(Exception):
    """Raised on every rank at the end of the step in which a stop signal arrived, after the checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path, run_dir: Path, rank: int = 0,
                 overrides: Sequence[str] = ()) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        self.rank = rank  # the global rank that raised it: only rank 0's is reported
        self.what = f"{signal.Signals(signum).name} at step {step}: checkpoint saved: {checkpoint}"
        # A resumed run's overrides (max_steps=16) are in no snapshot: the command gives them again.
        again = shlex.join(["python", "-m", "forgather.run", "--resume", str(run_dir), *overrides])
        super().__init__(f"{self.what} ; continue with: {again}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for a process ended by the signal


class PendingCommand:
    """A queued action and the reply its client waits for (on `conn`, at most `timeout` seconds)."""

    def __init__(self, name: str, timeout: float | None = None, conn: socket.socket | None = None) -> None:
        self.name = name
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._conn = conn
        self.reply: dict[str, Any] = {}
        self.done = threading.Event()
        self.replied = threading.Event()

    def finish(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.done.set()

    def abandoned(self) -> bool:
        """Whether its client has stopped waiting: its timeout passed, or it went away (Ctrl-C)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        if self._conn is None:
            return False
        try:
            # Readable with nothing to read: the client closed its end. (A peek, never a wait: `select` first.)
            return bool(select.select([self._conn], [], [], 0)[0]) and self._conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class ControlServer:
    """Accepts connections on a Unix socket in daemon threads; queues actions, answers status directly."""

    def __init__(self, path: Path, status: Callable[[], dict[str, Any]], owner_uid: int | None = None) -> None:
        self.path = path
        self._status = status
        self._owner_uid = os.getuid() if owner_uid is None else owner_uid
        self._pending: queue.Queue[PendingCommand] = queue.Queue()
        self._closed = threading.Event()
        # Makes "closed?" + "enqueue" atomic against close()'s drain, so no client waits forever.
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
        except OSError as error:  # e.g. a path beyond the ~108 bytes a Unix socket's may have: name it
            sock.close()
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error
        os.chmod(self.path, 0o600)
        sock.listen()
        # accept() is not reliably woken by close() from another thread, so poll the closed flag.
        sock.settimeout(0.2)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="forgather-job-control", daemon=True).start()

    def take(self) -> PendingCommand | None:
        """The oldest queued action whose client still waits, or None; never blocks (called every training step)."""
        while True:
            try:
                pending = self._pending.get_nowait()
            except queue.Empty:
                return None
            if not pending.abandoned():
                return pending
            pending.finish({"ok": False, "error": f"'{pending.name}' withdrawn: its client stopped waiting"})

    def close(self) -> None:
        """Stop serving; clients still waiting are told the job ended before their command ran."""
        with self._lock:
            self._closed.set()
            while (pending := self.take()) is not None:
                pending.finish({"ok": False, "error": f"training ended before '{pending.name}' ran"})
        if self._sock is not None:
            self._sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        pending = None
        with conn:
            # Bounds reading the request and sending the reply, not the wait for an action.
            conn.settimeout(_IO_TIMEOUT_S)
            try:
                # Read before refusing: closing on unread data would reset the connection under the reply.
                request = job_registry.receive_message(conn)
                if not job_registry.peer_allowed(conn, self._owner_uid):
                    reply = {"ok": False, "error": "refused: not the job's owner"}
                else:
                    reply, pending = self._answer(request.get("command"), request.get("timeout"), conn)
                job_registry.send_message(conn, reply)
            except (OSError, ValueError):
                pass  # the client went away or spoke garbage; the job carries on
            except Exception as error:  # a failing status must not kill the server thread
                job_registry.send_message(conn, {"ok": False, "error": f"{type(error).__name__}: {error}"})
            finally:
                if pending is not None:
                    pending.replied.set()

    def _answer(
        self, command: Any, timeout: Any = None, conn: socket.socket | None = None
    ) -> tuple[dict[str, Any], PendingCommand | None]:
        """The reply to `command`; for an action, after the training loop has carried it out (or withdrawn it,
        once the client on `conn` has stopped waiting)."""
        if command == "status":
            return self._status(), None
        if command not in job_registry.ACTIONS:
            return {"ok": False, "error": f"unknown command {command!r}"}, None
        valid = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
        pending = PendingCommand(command, timeout if valid else None, conn)
        with self._lock:
            if self._closed.is_set():
                return {"ok": False, "error": "training has ended"}, None
            self._pending.put(pending)
        pending.done.wait()
        return pending.reply, pending


class _StepClock:
    """Optimizer-step rate over a sliding window, for status and ETA."""

    def __init__(self, window: int = 50) -> None:
        self._points: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def tick(self, step: int) -> None:
        self._points.append((step, time.monotonic()))

    def seconds_per_step(self) -> float | None:
        if len(self._points) < 2:
            return None
        (s0, t0), (s1, t1) = self._points[0], self._points[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None


class JobControl(pl.Callback):
    """Registers the run and obeys `forgather control` commands.

    Args:
        run_dir: where control checkpoints go (`<run_dir>/checkpoints/`); default `trainer.default_root_dir`.
        job_id: registry id, one running job's at a time; default 8 random hex digits.
        check_every_n_steps: act on commands only at steps divisible by this (each check is one all-reduce).
        loss_key / throughput_key: the `trainer.callback_metrics` entries reported by `status`.
        registry_interval_s: how often the step shown by `forgather control list` is refreshed.
        stop_signals: signals that checkpoint and stop at the end of the step (names or numbers; () for
            Lightning's own handling).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        job_id: str | None = None,
        check_every_n_steps: int = 1,
        loss_key: str = "train/loss",
        throughput_key: str = "train/tokens_per_s",
        registry_interval_s: float = 10.0,
        stop_signals: Sequence[str | int] = ("SIGTERM", "SIGINT", "SIGUSR2"),
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.stop_signals = [_signal_number(s) for s in stop_signals]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.job_id = job_id or secrets.token_hex(4)
        self.check_every_n_steps = check_every_n_steps
        self.loss_key = loss_key
        self.throughput_key = throughput_key
        self.registry_interval_s = registry_interval_s
        self._server: ControlServer | None = None
        self._socket_dir: Path | None = None
        self._record: JobRecord | None = None
        self._clock = _StepClock()
        self._last_step = -1
        self._last_registry_write = 0.0
        self._metrics: dict[str, Any] = {}
        self._metrics_wanted = threading.Event()  # set by a status request, served at the next step's end
        self._metrics_fresh = threading.Event()
        self._metrics_step = -1
        self._total_steps: float | None = None
        self._epoch = 0
        self._start = 0.0
        self._signalled: int | None = None  # the stop signal received, until acted on
        self._stopped: tuple[int, int, Path | None] | None = None  # (signal, step, checkpoint) once acted on
        self._resumed: tuple[str, int] | None = None  # (checkpoint name, step) this fit resumed from
        self._replaced: dict[int, Any] = {}  # the handlers ours replaced, by signal
        self._registry_warned = False

    # Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.run_dir is None:
            self.run_dir = Path(trainer.default_root_dir)
        self.run_dir = self.run_dir.resolve()
        if trainer.is_global_zero:
            self._open()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._total_steps = float(total) if total != float("inf") else None
        self._resumed = (Path(trainer.ckpt_path).name, trainer.global_step) if trainer.ckpt_path else None
        self._catch_signals()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # mid gradient accumulation: commands wait for the optimizer step
        self._last_step = step
        if self._server is not None:
            self._observe(trainer, step)
        if step % self.check_every_n_steps:
            return
        pending = self._server.take() if self._server is not None else None
        if self._signalled is not None and self._stopped is None:
            code = _SIGNAL_CODE + self._signalled  # a command that meets a stop signal is answered by the stop
        else:
            code = _ACTION_CODES[pending.name] if pending else 0
        try:
            code = _agree(trainer, code)
            if code > _SIGNAL_CODE:
                self._stop_on_signal(trainer, code - _SIGNAL_CODE, step, pending)
            elif code:
                self._act(trainer, _ACTION_NAMES[code], step, pending)
        except BaseException as error:
            if pending is not None and not pending.done.is_set():  # taken off the queue: close() cannot answer it
                pending.finish({"ok": False, "error": f"'{pending.name}' failed: {type(error).__name__}: {error}; training ended"})
            raise

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_signals()
        if self._stopped is not None:  # before the callbacks after it: an interrupted run exports nothing
            self._raise_stopped(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_signals()
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_signals()
        self._close()

    # Stop signals

    def _catch_signals(self) -> None:
        self._signalled, self._stopped = None, None
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a trainer run from another thread keeps Lightning's)
        for signum in self.stop_signals:
            self._replaced[signum] = signal.signal(signum, self._on_signal)

    def _restore_signals(self) -> None:
        for signum, handler in self._replaced.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._replaced = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first arrival marks the job; the hook acts on it at the end of the step. A second one of the
        same signal is the user insisting: stop now, the way the signal stops a process by default."""
        name = signal.Signals(signum).name
        if self._signalled != signum:
            self._signalled = signum
            # os.write, not print: a handler may run while the main thread is inside a buffered write
            os.write(2, f"\n{name}: saving a checkpoint at the end of this step, then stopping "
                        f"({name} again stops at once, nothing saved)\n".encode())
            return
        self._restore_signals()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    # Rank 0: registry and server

    def _open(self) -> None:
        self._start = time.time()
        try:
            # A short private directory: socket paths are limited to ~108 bytes, cache paths can be longer.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="forgather-"))
            socket_path = self._socket_dir / "control.sock"
            self._server = ControlServer(socket_path, self._status)
            self._server.start()
            record = JobRecord(
                job_id=self.job_id,
                pid=os.getpid(),
                host=socket.gethostname(),
                run_dir=str(self.run_dir),
                start_time=self._start,
                step=0,
                socket=str(socket_path),
            )
            job_registry.register(record)
        except (job_registry.RegistryUnavailable, OSError) as error:
            self._close()
            _warn(f"job {self.job_id} is not registered (`forgather control` cannot reach it): {_reason(error)}")
            return
        except job_registry.JobIdTaken:
            self._close()
            raise
        self._record = record
        atexit.register(self._close)

    def _close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        if self._record is not None:  # ours: never the record of the job that holds the id
            self._record = None
            try:
                job_registry.remove_record(self.job_id)
            except (job_registry.RegistryUnavailable, OSError):
                pass  # `forgather control list` drops it once this process has ended
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        atexit.unregister(self._close)

    def _observe(self, trainer: pl.Trainer, step: int) -> None:
        """Keep what `status` reports: step timing and references to the reported metrics.

        Reading `trainer.callback_metrics` converts the progress-bar metrics to numbers, a host-device sync,
        so it happens on the steps the loggers write (which sync anyway) and when a `status` request asks."""
        self._clock.tick(step)
        self._epoch = trainer.current_epoch
        if writes_metrics(trainer, step) or self._metrics_wanted.is_set():
            self._metrics_wanted.clear()
            metrics = trainer.callback_metrics
            self._metrics = {key: metrics[key] for key in (self.loss_key, self.throughput_key) if key in metrics}
            self._metrics_step = step
            self._metrics_fresh.set()
        now = time.monotonic()
        if self._record is not None and now - self._last_registry_write >= self.registry_interval_s:
            self._last_registry_write = now
            self._record.step = step
            try:
                job_registry.write_record(self._record)
            except (job_registry.RegistryUnavailable, OSError) as error:  # a full home quota must not end the run
                if not self._registry_warned:
                    self._registry_warned = True
                    _warn(f"cannot refresh job {self.job_id} in the job registry: {_reason(error)}; training goes on")

    def _status(self) -> dict[str, Any]:
        """Called from the server thread; reads only values the training thread replaced whole.

        While training runs, asks the training thread for this step's metrics and waits for them up to
        `_STATUS_WAIT_S` (a longer step answers with the last ones read), unless they were read at this step."""
        if 0 <= self._last_step != self._metrics_step and self._server is not None:
            self._metrics_fresh.clear()
            self._metrics_wanted.set()
            self._metrics_fresh.wait(_STATUS_WAIT_S)
        step = self._last_step if self._last_step >= 0 else 0
        seconds_per_step = self._clock.seconds_per_step()
        eta = None
        if seconds_per_step is not None and self._total_steps is not None:
            eta = max(self._total_steps - step, 0) * seconds_per_step
        metrics = self._metrics
        return {
            "ok": True,
            "job_id": self.job_id,
            "step": step,
            "max_steps": self._total_steps,
            "epoch": self._epoch,
            "loss": _scalar(metrics.get(self.loss_key)),
            "tokens_per_s": _scalar(metrics.get(self.throughput_key)),
            "seconds_per_step": seconds_per_step,
            "eta_s": eta,
            "elapsed_s": time.time() - self._start,
            "run_dir": str(self.run_dir),
        }

    # Every rank: the action itself

    def _act(self, trainer: pl.Trainer, action: str, step: int, pending: PendingCommand | None) -> None:
        reply: dict[str, Any] = {"ok": True, "command": action, "step": step}
        failure = None
        if action in ("save", "stop"):
            try:
                reply["checkpoint"] = str(self._save(trainer, step))
            except OSError as error:  # raised on every rank alike: all go on training
                failure = f"the checkpoint could not be written: {_reason(error)}; training goes on"
                reply = {"ok": False, "command": action, "step": step, "error": f"{action}: {failure}"}
        ends = "training ends"
        if action == "stop" and failure is None:
            trainer.should_stop = True
            held = _minimum_not_reached(trainer, step)
            if held:  # Lightning trains on to the Trainer's minimum, then stops: say so, not that training ends now
                ends = reply["note"] = f"training ends at {held}, the Trainer's minimum"
        if trainer.is_global_zero:
            # The run's own output says what ended or checkpointed it, not only the client's terminal.
            done = {"save": "checkpoint saved, training goes on", "stop": f"checkpoint saved, {ends}",
                    "abort": "training ends, nothing saved"}[action]
            where = f": {reply['checkpoint']}" if "checkpoint" in reply else ""
            print(f"forgather control {action} (job {self.job_id}) at step {step}: {failure or done + where}", flush=True)
        if pending is not None:
            pending.finish(reply)
            pending.replied.wait(_REPLY_GRACE_S)
        if action == "abort":
            raise JobAborted(step)

    def _stop_on_signal(self, trainer: pl.Trainer, signum: int, step: int, pending: PendingCommand | None) -> None:
        """Checkpoint this step and end fit as a stop does; `on_train_end` then raises `JobStopped`.

        Our ModelCheckpoint with `save_last` writes `last.ckpt` after this hook, at this batch, once the loggers
        have this step's row; a second checkpoint of the same step would only double the time a scheduler's
        grace period has to cover. Without it (a plain Lightning script), the job writes its own."""
        trainer.should_stop = True
        callback = _last_checkpoint_callback(trainer)
        checkpoint = None if callback is not None else self._save(trainer, step)
        self._stopped = (signum, step, checkpoint)
        if pending is not None:  # a command that met the signal at this step: the job answers what it does
            where = checkpoint or Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            pending.finish({"ok": True, "command": "stop", "step": step, "checkpoint": str(where)})
            pending.replied.wait(_REPLY_GRACE_S)

    def _raise_stopped(self, trainer: pl.Trainer) -> None:
        signum, step, checkpoint = self._stopped
        self._stopped = None
        if checkpoint is None:
            checkpoint = Path(_last_checkpoint_callback(trainer).last_model_path)
        stopped = JobStopped(signum, step, checkpoint, self.run_dir, trainer.global_rank, self._resume_overrides())
        if trainer.is_global_zero:
            print(f"{stopped.what} (job {self.job_id}), training ends", flush=True)
        raise stopped

    def _resume_overrides(self) -> list[str]:
        """The overrides this fit was resumed with, as the run's snapshot recorded this resume (callbacks.snapshot:
        the entry of this checkpoint and step), or none: a fresh run's are in its snapshot's config."""
        if self._resumed is None or self.run_dir is None:
            return []
        from forgather.callbacks.snapshot import recorded_resumes

        name, step = self._resumed
        entry = next((e for e in reversed(recorded_resumes(self.run_dir)) if e.get("checkpoint") == name and e.get("step") == step), {})
        return [str(override) for override in entry.get("overrides") or []]

    def _save(self, trainer: pl.Trainer, step: int) -> Path:
        """Checkpoint under a temporary name, then rename: a reader never sees a partial checkpoint.
        (Lightning's own atomic write stages the file in the system temp dir, which is only atomic when
        that is on the run directory's filesystem.) A write that fails on any rank (a full disk) raises OSError
        on every rank, nothing left behind: the ranks agree on it, so that they all go on alike."""
        path = self.run_dir / "checkpoints" / f"control-step{step}.ckpt"
        staging = path.with_name(f".{path.name}.partial")
        error = None
        try:
            trainer.save_checkpoint(staging, weights_only=False)  # every rank: sharded strategies write parts
        except OSError as raised:
            error = raised
            if trainer.world_size > 1:  # the barrier that ends save_checkpoint, where the other ranks wait
                trainer.strategy.barrier("Trainer.save_checkpoint")
        if trainer.is_global_zero and error is None:
            try:
                os.replace(staging, path)
            except OSError as raised:
                error = raised
        if _agree(trainer, int(error is not None)):
            if trainer.is_global_zero:
                remove_quietly(staging)
                if error is None:  # renamed, but another rank's part of it is missing
                    remove_quietly(path)
            raise error or OSError("the checkpoint could not be written on another rank")
        return path


def _agree(trainer: pl.Trainer, code: int) -> int:
    """The one code every rank acts on: the highest of the ranks' codes. Only rank 0 serves commands, and any
    rank may be the one a stop signal reached (a signal code is above every command's). One all-reduce of an
    int; none for a single process."""
    if trainer.world_size == 1:
        return code
    from torch.distributed import ReduceOp  # here: torch builds without distributed support lack it

    return int(trainer.strategy.reduce(torch.tensor(code, device=trainer.strategy.root_device), reduce_op=ReduceOp.MAX))


def _last_checkpoint_callback(trainer: pl.Trainer):
    """The trainer's forgather ModelCheckpoint that writes `last.ckpt` at the batch fit ends after, if any."""
    from forgather.lightning.model_checkpoint import ModelCheckpoint

    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last), None)


def _signal_number(value: str | int) -> int:
    try:
        return int(signal.Signals[value] if isinstance(value, str) else signal.Signals(value))
    except (KeyError, ValueError):
        names = ", ".join(s.name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP))
        raise ValueError(f"stop_signals: {value!r} is not a signal; give names such as {names}") from None


def _minimum_not_reached(trainer: pl.Trainer, step: int) -> str | None:
    """What of the Trainer's minimum is not reached at `step` (`min_steps=N`, `min_epochs=N`: whole epochs, which
    Lightning sets to 1 when only min_steps is given), which a stop waits for; None when it ends training now."""
    loop = trainer.fit_loop
    held = []
    if loop.min_steps and step < loop.min_steps:
        held.append(f"min_steps={loop.min_steps}")
    if loop.min_epochs and loop.epoch_progress.current.processed < loop.min_epochs:
        held.append(f"min_epochs={loop.min_epochs}")
    return " and ".join(held) or None


def _reason(error: BaseException) -> str:
    """What went wrong, where: `PATH: strerror` for an OSError that names its file."""
    if not isinstance(error, OSError) or not error.strerror:
        return str(error)
    where = error.filename2 or error.filename  # a failed rename names its destination second
    return f"{where}: {error.strerror}" if where else error.strerror


def _warn(message: str) -> None:
    print(f"warning: forgather control: {message}", file=sys.stderr, flush=True)


def _scalar(value: Any) -> float | None:
    return None if value is None else float(value)
