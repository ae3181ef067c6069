"""`launcher=submitit`: each point a SLURM job, submitted through submitit as one job array.

Settings map onto submitit's AutoExecutor: `partition`, `timeout_min`, `nodes`, `gpus_per_node`,
`tasks_per_node`, `cpus_per_task`, `mem_gb`, `array_parallelism` (points running at once) and
`additional_parameters` (further sbatch options, `{account: ml}`). `cluster: local` runs the same pickled job
code on this machine with submitit's local executor (what the tests use); `cluster: null` lets submitit pick
(SLURM where `sbatch` exists). A job runs `forgather.launch.base.run_job` on its node: the point's command, its
output in the point's `output.log`, submitit's own logs under `<sweep>/.submitit/`. The sweep directory must
be on a filesystem the nodes share.
"""

from __future__ import annotations

import time
from typing import Any

from forgather.errors import UserError
from forgather.launch.base import Job, Launcher, Outcome, Status, read_outcome, run_job


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
        with executor.batch():
            submitted = [executor.submit(run_job, job) for job in jobs]
        for job in jobs:
            status.start(job)
        outcomes: dict[int, Outcome] = {}
        waiting = dict(zip((job.number for job in jobs), zip(jobs, submitted)))
        try:
            while waiting:
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
