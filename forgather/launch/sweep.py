"""One sweep from its settings to its results: the sweeper plans points, the launcher runs them, the sweep
directory keeps what a resume needs.

`multirun.yaml` (written before the first point starts) holds the sweep's command: project, template path,
outputs, the job's overrides and the runner's (launcher/sweeper). `--resume` reads it, rebuilds the same
points (an Optuna study reloads from `optuna.db`), keeps every point whose `outcome.json` says ok (or pruned)
and runs the others again in their directories: a point stopped or killed after a checkpoint, with the same
overrides, continues from its newest checkpoint (the point's runner resumes what its directory holds, as
`--resume` does a run); one without a checkpoint starts from scratch. The run directory of point N is
`<root>/N`.
"""

from __future__ import annotations

import shutil
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from forgather import overrides as ovr
from forgather import run_lock
from forgather.data.cache import atomic_write
from forgather.errors import UserError
from forgather.launch.base import FINISHED, OUTCOME_FILE, Job, Launcher, Outcome, Status, read_outcome
from forgather.launch.point import SWEEP_POINT_ENV
from forgather.yaml_file import read_recorded

RECORD_FILE = "multirun.yaml"


@dataclass
class Plan:
    """A point the sweeper chose: its number (its directory's name), label and single-valued overrides."""

    number: int
    label: str
    point: list[ovr.Override]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class SweepContext:
    """What a sweeper gets: the job's overrides, the group options (for glob()), `check` (raises the error a
    point's overrides would raise, before anything starts), and `launch` to run plans."""

    root: Path
    arguments: list[str]
    groups: dict[str, list[str]]
    check: Callable[[list[ovr.Override]], None]
    command: list[str]  # the runner's command for a point, before its overrides
    launcher: Launcher
    status: Status
    kept: dict[int, Outcome]  # points a resumed sweep keeps, by number
    checked_launcher: bool = False

    def launch(self, plans: list[Plan]) -> list[Outcome]:
        """Run the plans not kept from an earlier session; every plan's outcome, in the order of `plans`."""
        for plan in plans:
            self._check_kept(plan)
        todo = [plan for plan in plans if plan.number not in self.kept]
        if todo and not self.checked_launcher:
            self.launcher.check(len(todo))
            self.checked_launcher = True
        self.status.total = max(self.status.total, *(plan.number + 1 for plan in plans))
        for plan in plans:
            if plan.number in self.kept:
                kept = self.kept[plan.number]
                kept.label, kept.overrides = plan.label, [o.text for o in plan.point]
                self.status.add(plan.number, plan.label, f"{kept.status} (kept)")
            else:
                self.status.add(plan.number, plan.label)
        jobs = []
        for plan in todo:
            run_dir = self.root / str(plan.number)
            texts = [o.text for o in plan.point]
            if run_dir.exists():
                # A session killed by itself (kill -9 PID) leaves its points training: one is not started over beside them.
                with run_lock.hold(run_dir, "a point of this sweep trains", "a killed session left it running: wait for it "
                                   "to end, or stop it (kill PID), then resume"):
                    if not continues(run_dir, texts):  # an unfinished point without a checkpoint starts over
                        shutil.rmtree(run_dir)
                    else:
                        (run_dir / OUTCOME_FILE).unlink(missing_ok=True)  # the failed outcome of the session that stopped it
            jobs.append(Job(plan.number, plan.label, texts, [*self.command, *texts], run_dir, {**plan.env, SWEEP_POINT_ENV: str(run_dir)}))
        launched = {o.number: o for o in self.launcher.launch(jobs, self.status)} if jobs else {}
        return [self.kept[plan.number] if plan.number in self.kept else launched[plan.number] for plan in plans]

    def _check_kept(self, plan: Plan) -> None:
        """A kept point must be the one the resumed sweep plans under its number: a setting that changes the
        points (another sweeper, sweeper.paired) would give a finished point's results to other values."""
        kept = self.kept.get(plan.number)
        planned = [o.text for o in plan.point]
        if kept is None or not kept.overrides or sorted(kept.overrides) == sorted(planned):
            return
        ran = " ".join(t for t in kept.overrides if t not in planned) or "no other override"
        now = " ".join(t for t in planned if t not in kept.overrides) or "no other override"
        raise UserError(f"{self.root / str(plan.number)}: this finished point ran {ran}, where the resumed sweep plans "
                        f"{now} ; a resume runs the points the sweep recorded: leave out the settings that change them "
                        f"(another sweeper, sweeper.paired), or start a new sweep")


class Sweeper(ABC):
    @abstractmethod
    def run(self, context: SweepContext) -> list[Outcome]:
        """Plan points, check them, launch them through `context`; every point's outcome."""

    def summary(self) -> dict[str, Any]:
        """What the sweeper adds to results.json (Optuna: the best trial)."""
        return {}


def write_record(root: Path, record: dict[str, Any]) -> None:
    """The sweep's record (what `--resume` reruns), replaced atomically: a kill never leaves half of one."""
    atomic_write(root / RECORD_FILE, lambda path: path.write_text(yaml.safe_dump(record, sort_keys=False)))


def read_record(root: Path) -> dict[str, Any]:
    return read_recorded(root / RECORD_FILE, dict, f"restore it from a copy of the sweep: it records what --resume {root} runs")


def is_multirun(directory: Path) -> bool:
    return (directory / RECORD_FILE).is_file()


def recorded_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / "snapshot" / "overrides.yaml"
    return read_recorded(path, list, "restore it from a copy of the run") if path.is_file() else None


def continues(run_dir: Path, overrides: list[str]) -> bool:
    """Whether a point's directory from an earlier session is continued rather than started over: it holds a
    checkpoint and the run recorded the same overrides (an Optuna trial asked again is a new number)."""
    from forgather.run import latest_checkpoint

    return latest_checkpoint(run_dir) is not None and recorded_overrides(run_dir) == overrides


def kept_outcomes(root: Path) -> dict[int, Outcome]:
    """The points of an earlier session that finished (ok or pruned), by number."""
    kept = {}
    for path in root.glob(f"*/{OUTCOME_FILE}"):
        if path.parent.name.isdigit():
            number = int(path.parent.name)
            overrides = recorded_overrides(path.parent) or []
            outcome = read_outcome(Job(number, "", overrides, [], path.parent))
            if outcome.status in FINISHED:
                kept[number] = outcome
    return kept


def run(
    root: Path,
    launcher: Launcher,
    sweeper: Sweeper,
    arguments: list[str],
    groups: dict[str, list[str]],
    check: Callable[[list[ovr.Override]], None],
    command: list[str],
    resume: bool,
) -> list[Outcome]:
    """Run a sweep in `root` (a resumed one keeps its finished points); every point's outcome, and writes
    the results files."""
    from forgather.launch.results import write_results

    # One session at a time: a second one resuming this sweep would start over the points the first is training.
    with run_lock.hold(root, "a sweep runs", "wait for it to end, or stop it first (Ctrl-C in its terminal, or kill PID)"):
        kept = kept_outcomes(root) if resume else {}
        if resume:
            print(f"resuming {root}: {len(kept)} finished point{'s' * (len(kept) != 1)} kept", flush=True)
        try:
            with Status(getattr(sweeper, "n_trials", 0)) as status:
                context = SweepContext(root, arguments, groups, check, command, launcher, status, kept)
                outcomes = sweeper.run(context)
        except (SystemExit, KeyboardInterrupt):  # SIGTERM (launch.local) or Ctrl-C: the points checkpointed
            if any(path.is_dir() for path in root.iterdir()):  # else the runner removes the sweep it refused
                print(f"the sweep continues with: python -m forgather.run --resume {root}", file=sys.stderr, flush=True)
            raise
        write_results(root, outcomes, sweeper.summary())
    sys.stdout.flush()
    return outcomes
