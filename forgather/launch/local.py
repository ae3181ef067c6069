"""`launcher=local`: each point is its own `python -m forgather.run` process on this machine, `jobs` at a
time, each with its output in `<run_dir>/output.log`.

GPUs: with `gpus_per_job: N`, every running point gets N GPUs of its own through CUDA_VISIBLE_DEVICES, taken
from `gpus` (default: CUDA_VISIBLE_DEVICES of this process, else every GPU torch sees); `jobs` is then at
most the GPUs divided by N. CPU threads: with several jobs, each point gets OMP_NUM_THREADS = cores / the points
that run at once (`jobs`, or the batch's points where fewer; unless set already), so that the points share the
cores instead of fighting over them. Stopping the sweep (Ctrl-C, SIGTERM) stops the running points.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from forgather.errors import UserError
from forgather.launch.base import Job, Launcher, Outcome, Status, read_outcome, start_job


class LocalLauncher(Launcher):
    def __init__(self, jobs: int = 1, gpus_per_job: int = 0, gpus: str | None = None, poll_seconds: float = 0.2) -> None:
        if jobs < 1:
            raise UserError(f"launcher.jobs={jobs}: run at least one point at a time (launcher.jobs=1 or more)")
        if gpus_per_job < 0:
            raise UserError(f"launcher.gpus_per_job={gpus_per_job}: give 0 (no GPU) or more")
        self.jobs = jobs
        self.gpus_per_job = gpus_per_job
        self.gpus = gpus
        self.poll_seconds = poll_seconds

    @property
    def parallel(self) -> int:
        return self.jobs

    def _gpu_pool(self) -> list[str]:
        if self.gpus is not None:
            return [g.strip() for g in str(self.gpus).split(",") if g.strip()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [g.strip() for g in visible.split(",") if g.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]

    def _threads(self, at_once: int) -> dict[str, str]:
        """Points that share the CPU split its cores (torch's intra-op threads follow OMP_NUM_THREADS):
        `at_once` points each using every core would oversubscribe it. A value the user set is kept."""
        if at_once == 1 or "OMP_NUM_THREADS" in os.environ:
            return {}
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // at_once))}

    def check(self, jobs: int) -> None:
        if self.gpus_per_job:
            pool = self._gpu_pool()
            if len(pool) < self.gpus_per_job * min(self.jobs, jobs):
                raise UserError(
                    f"launcher.jobs={self.jobs} x launcher.gpus_per_job={self.gpus_per_job} needs "
                    f"{self.gpus_per_job * min(self.jobs, jobs)} GPUs; {len(pool)} available ({','.join(pool) or 'none'}): "
                    f"{'lower launcher.gpus_per_job' if min(self.jobs, jobs) == 1 else 'lower launcher.jobs or launcher.gpus_per_job'}, "
                    f"or name the GPUs with launcher.gpus=0,1,..."
                )

    def launch(self, jobs: list[Job], status: Status) -> list[Outcome]:
        free = self._gpu_pool() if self.gpus_per_job else []
        waiting = list(jobs)
        running: dict[int, tuple[Job, subprocess.Popen, list[str]]] = {}
        outcomes: dict[int, Outcome] = {}
        threads = self._threads(min(self.jobs, len(jobs)))  # launcher.jobs=8 over 2 points: each gets half the cores
        previous = _stop_on_sigterm()
        try:
            while waiting or running:
                while waiting and len(running) < self.jobs:
                    job = waiting.pop(0)
                    gpus = [free.pop(0) for _ in range(self.gpus_per_job)]
                    env = {**os.environ, **threads, **job.env, **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if self.gpus_per_job else {})}
                    status.start(job)
                    running[job.number] = (job, start_job(job, env), gpus)
                for number, (job, process, gpus) in list(running.items()):
                    if process.poll() is None:
                        continue
                    free.extend(gpus)
                    del running[number]
                    outcomes[number] = read_outcome(job, process.returncode)
                    status.end(outcomes[number])
                time.sleep(self.poll_seconds if running else 0)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            for job, process, _ in running.values():  # interrupted: the points go down with the sweep
                process.terminate()
            for job, process, _ in running.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        return [outcomes[job.number] for job in jobs]


def _stop_on_sigterm():
    """While points run, SIGTERM ends the sweep the way Ctrl-C does (the running points are terminated,
    not orphaned); the previous handler, or None off the main thread (where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)
