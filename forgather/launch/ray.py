"""`launcher=ray`: each point a Ray task, on an existing cluster (`address: HOST:PORT`, or `auto` for the one
`ray start` runs here) or on a local Ray started for the sweep (`address: null`, `num_cpus` CPUs).

A task asks for `num_cpus_per_job` CPUs and `num_gpus_per_job` GPUs, so Ray runs as many points at once as
the cluster has room for (Ray sets CUDA_VISIBLE_DEVICES for the task), and runs
`forgather.launch.base.run_job`: the point's command, output in its `output.log`. The sweep directory must be
on a filesystem the workers share. An address where nothing answers is an error before any point starts.
"""

from __future__ import annotations

import socket

from forgather.errors import UserError
from forgather.launch.base import Job, Launcher, Outcome, Status, read_outcome, run_job


class RayLauncher(Launcher):
    def __init__(self, address: str | None = None, num_cpus_per_job: float = 1, num_gpus_per_job: float = 0, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus_per_job = num_cpus_per_job
        self.num_gpus_per_job = num_gpus_per_job
        self.num_cpus = num_cpus

    @property
    def parallel(self) -> int:
        import os
        import sys

        if self.address is not None:  # a cluster's room is its own, not this machine's: Ray queues what waits
            return sys.maxsize
        return max(1, int((self.num_cpus or os.cpu_count() or 1) // max(self.num_cpus_per_job, 1e-9)))

    def _reachable(self) -> None:
        address = str(self.address)
        if address == "auto":
            return
        host, _, port = address.split("://")[-1].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as error:
            raise UserError(
                f"launcher.address={address}: no Ray cluster answers there ({error}); start one "
                f"(ray start --head) or leave launcher.address=null for a local Ray"
            ) from error

    def check(self, jobs: int) -> None:
        if self.address is not None:
            self._reachable()
        try:
            import ray
        except ImportError as error:
            raise UserError("launcher=ray needs Ray: pip install 'forgather[ray]'") from error
        if not ray.is_initialized():
            local = {"num_cpus": self.num_cpus} if self.address is None else {}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **local)

    def launch(self, jobs: list[Job], status: Status) -> list[Outcome]:
        import ray

        task = ray.remote(num_cpus=self.num_cpus_per_job, num_gpus=self.num_gpus_per_job)(run_job)
        pending = {task.remote(job): job for job in jobs}
        for job in jobs:
            status.start(job)
        outcomes: dict[int, Outcome] = {}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for reference in done:
                    job = pending.pop(reference)
                    try:
                        outcomes[job.number] = read_outcome(job, ray.get(reference))
                    except Exception as error:  # the task itself failed (a worker died)
                        outcomes[job.number] = Outcome(job.number, job.label, job.overrides, "failed", error=f"Ray task: {str(error).strip().splitlines()[0]}")
                    status.end(outcomes[job.number])
        finally:
            for reference in pending:
                ray.cancel(reference, force=True)
        return [outcomes[job.number] for job in jobs]
