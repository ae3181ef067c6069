"""What every launcher shares: a `Job` (one point's command), its `Outcome` (read back from the point's
`outcome.json`), the `Launcher` interface, `run_job` (the blocking call the cluster launchers ship to their
workers), and the one-line-per-point status shown while a sweep runs.

A launcher only starts commands and waits; it learns how a point ended from the file the point wrote, so a
point that dies without writing it (killed, out of memory) is reported from its exit code and log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgather.data.cache import atomic_write
from forgather.yaml_file import read_recorded

OUTCOME_FILE = "outcome.json"
LOG_FILE = "output.log"
FINISHED = ("ok", "pruned", "diverged")  # statuses a resumed sweep keeps (a diverged point would diverge again)


@dataclass
class Job:
    """One point to run: `command` in `run_dir` (created by the sweep), with `env` added to the environment."""

    number: int
    label: str  # the swept overrides, for the status line and the table
    overrides: list[str]  # every override of the point, single-valued
    command: list[str]
    run_dir: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    number: int
    label: str
    overrides: list[str]
    status: str  # ok, failed, pruned, diverged
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""  # the root cause in one line, for the table
    report: str = ""  # what the point printed for its error (one line for a user's mistake)
    started: float = 0.0
    ended: float = 0.0
    intermediate: dict[int, float] = field(default_factory=dict)


def write_outcome(run_dir: Path, data: dict[str, Any]) -> None:
    """Written last by a point, atomically: a present outcome.json is a whole one."""
    atomic_write(run_dir / OUTCOME_FILE, lambda path: path.write_text(json.dumps(data, indent=1)))


def read_outcome(job: Job, returncode: int | None = None) -> Outcome:
    """The outcome `job` recorded; a point that ended without recording one failed, said from its exit code
    and the last line of its log."""
    path = job.run_dir / OUTCOME_FILE
    if path.is_file():
        data = read_recorded(path, dict, "delete it to run the point again", parse=json.loads)
        return Outcome(
            job.number,
            job.label,
            job.overrides,
            data["status"],
            {k: float(v) for k, v in data.get("metrics", {}).items()},
            data.get("error", ""),
            data.get("report", ""),
            data.get("started", 0.0),
            data.get("ended", 0.0),
            {int(k): float(v) for k, v in data.get("intermediate", {}).items()},
        )
    log = job.run_dir / LOG_FILE
    last = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.strip()), "") if log.is_file() else ""
    how = f"killed by signal {-returncode}" if returncode is not None and returncode < 0 else f"exit status {returncode}"
    error = f"the point's process ended ({how}) without recording an outcome; see {log}" + (f": {last.strip()}" if last else "")
    return Outcome(job.number, job.label, job.overrides, "failed", error=error, report=f"error: {error}")


LAUNCHER_PID_ENV = "FORGATHER_LAUNCHER_PID"  # the process that started a point: it ends with it (see point.py)


def start_job(job: Job, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `job`'s command, its output appended to its log, in `env` (default: this environment and the
    job's), told which process started it (the point ends when that process dies: `end_with_launcher`)."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**(env if env is not None else {**os.environ, **job.env}), LAUNCHER_PID_ENV: str(os.getpid())}
    with open(job.run_dir / LOG_FILE, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(job.command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_job(job: Job) -> int:
    """Run `job` to its end, output to its log; the exit status. What Ray runs on a worker (submitit: PointJob)."""
    return start_job(job).wait()


class Status:
    """One line per point: queued, running (with its elapsed time), then how it ended. In a terminal a live
    rich table; otherwise (a pipe, a log file, a test) a plain line when a point starts and when it ends."""

    def __init__(self, total: int, console=None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.total = total
        self.lines: dict[int, tuple[str, str]] = {}
        self.started: dict[int, float] = {}
        self.live = None
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.render(), console=self.console, refresh_per_second=2, get_renderable=self.render)

    def __enter__(self) -> "Status":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.stop()

    def add(self, number: int, label: str, state: str = "queued") -> None:
        self.lines[number] = (label, state)

    def start(self, job: Job) -> None:
        self.started[job.number] = time.monotonic()
        self.lines[job.number] = (job.label, "running")
        if self.live is None:
            print(f"[sweep {job.number + 1}/{self.total}] {job.label}", flush=True)

    def end(self, outcome: Outcome) -> None:
        seconds = time.monotonic() - self.started.get(outcome.number, time.monotonic())
        word = outcome.status if outcome.status != "failed" else f"failed: {outcome.error}"
        self.lines[outcome.number] = (outcome.label, f"{word} ({seconds:.1f} s)")
        if outcome.report:  # what the point printed for its error, as a single run prints it
            print(outcome.report, end="" if outcome.report.endswith("\n") else "\n", file=sys.stderr, flush=True)
        if self.live is None:
            print(f"[sweep {outcome.number + 1}/{self.total}] {word} ({seconds:.1f} s) {outcome.label}", flush=True)

    def render(self):
        """The live table: one line a point."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=None, show_header=False)
        now = time.monotonic()
        for number, (label, state) in sorted(self.lines.items()):
            if state == "running":
                state = f"[yellow]running {now - self.started[number]:.0f} s[/yellow]"
            elif state.startswith("failed"):
                state = f"[red]{escape(state)}[/red]"
            elif state.startswith("ok"):
                state = f"[green]{state}[/green]"
            table.add_row(f"{number}", escape(label), state)
        return table


class Launcher(ABC):
    """Runs the jobs of a sweep on an engine and returns every job's outcome, in the order of `jobs`.
    `check()` says what is wrong with the settings before any job starts (an unreachable cluster, too few
    GPUs); `launch` reports each job's start and end to `status`."""

    def check(self, jobs: int) -> None:  # noqa: B027 - most launchers have nothing to check
        """Raise a UserError when the launcher cannot run `jobs` jobs as configured."""

    @abstractmethod
    def launch(self, jobs: list[Job], status: Status) -> list[Outcome]: ...

    @property
    def parallel(self) -> int:
        """How many jobs run at once (Optuna asks for that many trials at a time at most)."""
        return 1
