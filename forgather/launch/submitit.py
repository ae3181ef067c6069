"""`launcher=submitit`: each point a SLURM job, submitted through submitit as one job array.

Settings map onto submitit's AutoExecutor: `partition`, `timeout_min`, `nodes`, `gpus_per_node`,
`tasks_per_node`, `cpus_per_task`, `mem_gb`, `array_parallelism` (points running at once) and
`additional_parameters` (further sbatch options, `{account: ml}`). `cluster: local` runs the same pickled job
code on this machine with submitit's local executor (what the tests use), `array_parallelism` at a time as
SLURM would; `cluster: null` lets submitit pick (SLURM where `sbatch` exists). A job runs `PointJob` on its node: the point's command (as
`forgather.launch.base.run_job`), its output in the point's `output.log`, submitit's own logs under
`<sweep>/.submitit/`. The sweep directory must be on a filesystem the nodes share.

Time limits and preemption: SLURM warns a job before it ends it (submitit asks for USR2 `signal_delay_s`
before the time limit; a preemption sends it too). submitit then calls the job's `checkpoint`: `PointJob`'s
passes SIGTERM to the point's process, which checkpoints the step it is in and exits (JobControl), waits
for it, and has submitit requeue the job (up to submitit's count of time-outs); the requeued job runs the
command again, and the point continues from its checkpoint (`Runner.run_point`), as `--resume` would. A
cancelled job (the sweep stopped: the local executor interrupts it) terminates its point with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from forgather.errors import UserError
from forgather.launch.base import Job, Launcher, Outcome, Status, read_outcome, start_job


class SubmititLauncher(Launcher):
    def __init__(
        self,
        cluster: str | None = None,
        partition: str | None = None,
        timeout_min: int = 60,
        nodes: int = 1,
        gpus_per_node: int = 0,
        tasks_per_node: int = 1,
        cpus_per_task: int = 1,
        mem_gb: int | None = None,
        array_parallelism: int = 256,
        additional_parameters: dict[str, Any] | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        if array_parallelism < 1:
            raise UserError(f"launcher.array_parallelism={array_parallelism}: run at least one point at a time (1 or more)")
        if not isinstance(additional_parameters, (dict, type(None))):
            raise UserError(f"launcher.additional_parameters={additional_parameters}: give sbatch options as a mapping, "
                            f"e.g. launcher.additional_parameters={{account: ml}}")
        self.cluster = cluster
        self.parameters = {
            "timeout_min": timeout_min,
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "tasks_per_node": tasks_per_node,
            "cpus_per_task": cpus_per_task,
            "mem_gb": mem_gb,
            "slurm_partition": partition,
            "slurm_array_parallelism": array_parallelism,
            "slurm_additional_parameters": dict(additional_parameters or {}) or None,
        }
        self.array_parallelism = array_parallelism
        self.poll_seconds = poll_seconds

    @property
    def parallel(self) -> int:
        return self.array_parallelism

    def _executor(self, folder):
        try:
            import submitit
        except ImportError as error:
            raise UserError("launcher=submitit needs submitit: pip install 'forgather[sweep]'") from error
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        except ValueError as error:
            raise UserError(f"launcher.cluster={self.cluster}: {error} (use slurm, local, or null to let submitit choose)") from error
        executor.update_parameters(**self.parameters)
        return executor

    def check(self, jobs: int) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self._executor(folder)

    def launch(self, jobs: list[Job], status: Status) -> list[Outcome]:
        executor = self._executor(jobs[0].run_dir.parent / ".submitit")
        # SLURM holds the array to array_parallelism itself; submitit's local executor starts every job it is
        # given at once, so here the jobs are given to it array_parallelism at a time.
        at_once = self.array_parallelism if executor.cluster == "local" else len(jobs)
        queued = list(jobs)
        outcomes: dict[int, Outcome] = {}
        waiting: dict[int, tuple[Job, Any]] = {}
        try:
            while queued or waiting:
                if queued and len(waiting) < at_once:
                    batch, queued = queued[: at_once - len(waiting)], queued[at_once - len(waiting):]
                    with executor.batch():
                        submitted = [executor.submit(PointJob(), job) for job in batch]
                    for job, handle in zip(batch, submitted):
                        waiting[job.number] = (job, handle)
                        status.start(job)
                for number, (job, handle) in list(waiting.items()):
                    if not handle.done():
                        continue
                    del waiting[number]
                    try:
                        outcomes[number] = read_outcome(job, handle.result())
                    except Exception as error:  # the job itself failed (node failure, timeout, cancelled)
                        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                        outcomes[number] = Outcome(job.number, job.label, job.overrides, "failed", error=f"submitit job {handle.job_id}: {first}")
                    status.end(outcomes[number])
                time.sleep(self.poll_seconds if waiting else 0)
        finally:
            for job, handle in waiting.values():
                handle.cancel(check=False)
        return [outcomes[job.number] for job in jobs]


class PointJob:
    """The callable a submitit job runs: `run_job`, which submitit can checkpoint (see the module docstring)."""

    grace_s = 300.0  # how long the point may take to finish its step and write its checkpoint

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def __call__(self, job: Job) -> int:
        self._process = start_job(job)
        try:
            return self._process.wait()
        except BaseException:  # the job cancelled (submitit's local executor interrupts it): the point goes too
            if not _ended(self._process):
                self._process.terminate()
            raise

    def checkpoint(self, job: Job):
        """Called by submitit's handler of the time-limit signal, in this process: stop the point with its
        checkpoint, then give submitit the same job to requeue."""
        from submitit.helpers import DelayedSubmission

        process = self._process
        if process is not None and not _ended(process):
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while not _ended(process):
                if time.monotonic() > deadline:
                    process.kill()
                    break
                time.sleep(0.2)
        return DelayedSubmission(PointJob(), job)  # a new one: a running process does not pickle

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._process = None


def _ended(process: subprocess.Popen) -> bool:
    """Whether `process` has exited, without reaping it. The handler that asks runs while `__call__` waits in
    `Popen.wait`, which holds the Popen's lock until the process is reaped: waiting on the Popen again from
    the handler would never return."""
    if process.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True
