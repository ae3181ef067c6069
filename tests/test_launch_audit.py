"""What a sweep's user hit in an audit of the launchers and sweepers: submitit's local executor running every
point at once and leaving them running when the sweep stops, a resumed Optuna search that silently kept
another direction or metric, a search asking more trials at once than its launcher runs, a choice checked
only at its first value, a trial's NaN metric recorded ok and failed by Optuna, a resume deleting a point that
still trains, points given a share of cores for points that never ran beside them, a swept key that nothing
reads said only in each point's log, and settings whose mistakes gave a wrong instruction, a traceback, or
repeated points."""

from __future__ import annotations

import _thread
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from forgather import overrides as ovr
from forgather.errors import UserError
from forgather.launch.base import Job, Launcher, Outcome, Status
from forgather.launch.basic import BasicSweeper
from forgather.launch.optuna import OptunaSweeper, search_space
from forgather.launch.submitit import SubmititLauncher
from forgather.launch.sweep import SweepContext
from forgather.run import main

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
MICRO = ["+experiment=micro", "max_steps=2"]


def run(outputs: Path, *arguments: str) -> int:
    return main(["-p", PROJECT, "--outputs", str(outputs), *arguments])


def sleeper(tmp_path: Path, number: int, seconds: float) -> Job:
    """A point that records its pid and when it started and ended, and sleeps between."""
    code = (f"import json, os, time; d = {str(tmp_path)!r}; start = time.time(); "
            f"open(os.path.join(d, 'pid{number}'), 'w').write(str(os.getpid())); time.sleep({seconds}); "
            f"open(os.path.join(d, 'span{number}'), 'w').write(json.dumps([start, time.time()]))")
    return Job(number, f"p={number}", [f"p={number}"], [sys.executable, "-c", code], tmp_path / str(number))


# -- submitit's local executor -----------------------------------------------------------------------------


def test_submitit_local_executor_runs_array_parallelism_points_at_a_time(tmp_path):
    """It started every job at once: launcher.array_parallelism=1 ran three points side by side."""
    jobs = [sleeper(tmp_path, n, 0.6) for n in range(3)]
    SubmititLauncher(cluster="local", array_parallelism=1, poll_seconds=0.05).launch(jobs, Status(3))
    spans = sorted(json.loads((tmp_path / f"span{n}").read_text()) for n in range(3))
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), f"points overlapped: {spans}"


def test_an_interrupted_submitit_sweep_stops_its_running_points(tmp_path):
    """Ctrl-C (or SIGTERM) cancels the jobs; the points, children of the jobs' workers, went on training."""
    import psutil

    jobs = [sleeper(tmp_path, n, 60) for n in range(2)]

    def interrupt_once_running():
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"pid{n}").is_file() for n in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        SubmititLauncher(cluster="local", array_parallelism=2, poll_seconds=0.05).launch(jobs, Status(2))
    points = [psutil.Process(int((tmp_path / f"pid{n}").read_text())) for n in range(2)]
    try:
        _, alive = psutil.wait_procs(points, timeout=8)
        assert alive == [], "a point outlived its sweep"
    finally:
        for point in points:
            if point.is_running():
                point.kill()


def test_bad_submitit_settings_are_one_line_naming_them(tmp_path, capsys):
    for setting, message in (("launcher.array_parallelism=0", "launcher.array_parallelism=0: run at least one point at a time"),
                             ("launcher.additional_parameters=account", "give sbatch options as a mapping, e.g. launcher.additional_parameters={account: ml}")):
        assert run(tmp_path, "-m", *MICRO, "lr=1e-3,3e-3", "launcher=submitit", "launcher.cluster=local", setting) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "multirun").exists()


# -- Optuna ------------------------------------------------------------------------------------------------


class Recorded(Launcher):
    """Runs nothing: each job ends ok with `metrics`; the sizes of the batches it was given are kept."""

    def __init__(self, metrics: dict[str, float], parallel: int = 1, status: str = "ok") -> None:
        self.metrics, self.batches, self._parallel, self.status = metrics, [], parallel, status

    @property
    def parallel(self) -> int:
        return self._parallel

    def launch(self, jobs: list[Job], status: Status) -> list[Outcome]:
        self.batches.append(len(jobs))
        for job in jobs:
            job.run_dir.mkdir(parents=True, exist_ok=True)
        return [Outcome(job.number, job.label, job.overrides, self.status, dict(self.metrics)) for job in jobs]


def search(root: Path, launcher: Launcher, **settings) -> OptunaSweeper:
    sweeper = OptunaSweeper(pruner="none", **settings)
    sweeper.run(SweepContext(root, ["lr=interval(1e-4,1e-2)"], {}, lambda point: None, ["train"], launcher, Status(0), {}))
    return sweeper


@pytest.mark.parametrize(("changed", "message"), [
    ({"direction": "maximize"}, "sweeper.direction=maximize: the study in {db} was created to minimize, and its trials were told "
                                "so ; resume with sweeper.direction=minimize, or start a new sweep"),
    ({"metric": "val/acc"}, "sweeper.metric=val/acc: the study in {db} ranks its trials by val/loss ; resume with "
                            "sweeper.metric=val/loss, or start a new sweep"),
], ids=["direction", "metric"])
def test_a_resumed_search_with_another_objective_is_refused(tmp_path, changed, message):
    """Optuna loaded the study with its first direction whatever was asked, and a new metric's values were
    ranked against the old one's: the best trial was reported as 'val/acc=1' from a val/loss."""
    import optuna

    search(tmp_path, Recorded({"val/loss": 1.0}), n_trials=2)
    with pytest.raises(UserError) as refused:
        search(tmp_path, Recorded({"val/loss": 2.0, "val/acc": 0.5}), n_trials=3, **changed)
    assert str(refused.value) == message.format(db=tmp_path / "optuna.db")
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2, "no trial ran under the changed objective"
    search(tmp_path, Recorded({"val/loss": 0.5}), n_trials=3)  # the same objective resumes
    assert len(optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 3


def test_a_search_whose_trials_logged_no_metric_resumes_with_the_corrected_one(tmp_path):
    """What the misspelled-metric error says to do: nothing was told under the first name."""
    search(tmp_path, Recorded({"val/los": 1.0}, status="failed"), n_trials=1, metric="val/los")
    search(tmp_path, Recorded({"val/loss": 1.0}), n_trials=1, metric="val/loss")
    with pytest.raises(UserError, match="ranks its trials by val/loss"):
        search(tmp_path, Recorded({"val/los": 1.0}), n_trials=2, metric="val/los")


def test_a_search_asks_no_more_trials_at_once_than_the_launcher_runs(tmp_path, capsys):
    """sweeper.n_jobs=3 with one point at a time asked three trials blind, then ran them one after another."""
    launcher = Recorded({"val/loss": 1.0}, parallel=1)
    search(tmp_path, launcher, n_trials=3, n_jobs=3)
    assert launcher.batches == [1, 1, 1]
    assert "warning: sweeper.n_jobs=3, but the launcher runs 1 point at a time" in capsys.readouterr().err
    wide = Recorded({"val/loss": 1.0}, parallel=4)
    (tmp_path / "wide").mkdir()
    search(tmp_path / "wide", wide, n_trials=3, n_jobs=2)
    assert wide.batches == [2, 1]
    from forgather.launch.ray import RayLauncher

    assert RayLauncher(num_cpus=2).parallel == 2 and RayLauncher(address="auto").parallel >= 1024, \
        "a local Ray runs as many as its CPUs, a cluster as many as it has room for, which this machine does not know"


def test_local_jobs_a_search_leaves_idle_are_noted(tmp_path, capsys):
    """launcher.jobs=4 with the default sweeper.n_jobs=1 ran one trial at a time, without a word."""
    class LocalRecorded(Recorded):
        """As the local launcher: `jobs` points at once."""

        def __init__(self, jobs: int) -> None:
            super().__init__({"val/loss": 1.0}, parallel=jobs)
            self.jobs = jobs

    search(tmp_path, LocalRecorded(jobs=4), n_trials=2, n_jobs=1)
    assert ("note: launcher.jobs=4, but sweeper.n_jobs=1: the search asks 1 trial at a time, so 1 point run at once ;"
            " set sweeper.n_jobs=4 to use them all") in capsys.readouterr().err
    (tmp_path / "all").mkdir()
    search(tmp_path / "all", LocalRecorded(jobs=2), n_trials=2, n_jobs=2)
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "message"), [
    ({"n_startup_trials": -1}, "sweeper.n_startup_trials=-1: give 0 or more"),
    ({"n_warmup_steps": -2}, "sweeper.n_warmup_steps=-2: give 0 or more"),
    ({"metric": ""}, "sweeper.metric is empty: name the logged metric the search optimizes"),
], ids=["n_startup_trials", "n_warmup_steps", "metric"])
def test_bad_optuna_settings_name_the_setting(setting, message):
    """Optuna's own 'Number of startup trials cannot be negative' named no setting; an empty metric ran every
    trial to its end, each failing."""
    with pytest.raises(UserError, match=message):
        OptunaSweeper(**setting)


# -- overrides ---------------------------------------------------------------------------------------------


def test_a_key_swept_twice_is_refused():
    """`lr=1e-3,3e-3 lr=1e-4,3e-4` ran four points, two of each of the second's values."""
    with pytest.raises(ovr.OverrideError, match=r"^lr is swept twice \(lr=1e-3,3e-3 and lr=1e-4,3e-4\) ; give all its values in one override"):
        BasicSweeper().plan(["lr=1e-3,3e-3", "seed=1", "lr=1e-4,3e-4"], {})
    assert len(BasicSweeper().plan(["lr=1e-3,3e-3", "seed=1", "seed=2"], {})) == 2, "a fixed value given twice is no sweep"
    with pytest.raises(ovr.OverrideError, match=r"lr=choice\(1e-3,1e-2\): lr is searched twice"):
        search_space(["lr=interval(1e-4,1e-2)", "lr=choice(1e-3,1e-2)"])


@pytest.mark.parametrize(("setting", "message"), [
    ("sweeper.paired=lr,warmup_steps", "sweeper.paired=lr,warmup_steps: a launcher or sweeper setting takes one value, not a sweep ; "
                                       "write a list in brackets (sweeper.paired=[a,b])"),
    ("sweeper.paired=lr", "sweeper.paired=lr: name the keys swept together in a list, e.g. sweeper.paired=[lr,warmup_steps]"),
], ids=["comma list", "one key"])
def test_paired_keys_not_in_brackets_say_to_write_a_list(tmp_path, capsys, setting, message):
    """A comma list was told to 'add -m' (the sweep had it); one key was split into its letters ('names l, r')."""
    assert run(tmp_path, "-m", *MICRO, "lr=1e-3,3e-3", "warmup_steps=1,2", setting) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(("space", "message"), [
    ("optimizer=choice(adamw,adafactr)", "optimizer=adafactr: no option 'adafactr' in group 'optimizer'; did you mean 'adafactor'"),
    ("max_steps=choice(2,two)", "max_steps=two: max_steps is int (2); got str 'two'"),
], ids=["option", "type"])
def test_every_choice_of_a_search_is_checked_before_any_trial(tmp_path, capsys, space, message):
    """Only a choice's first value was checked: every trial that drew the misspelled one failed as it started."""
    assert run(tmp_path, "-m", *MICRO, space, "sweeper=optuna", "sweeper.n_trials=2") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "multirun").exists()


def test_a_trial_whose_metric_is_nan_is_recorded_as_diverged_and_told_as_pruned(tmp_path, monkeypatch):
    """It was recorded ok, where Optuna failed the trial told nan: the results said ok, the study FAIL, and a
    resumed search ran the same values again."""
    import optuna

    from forgather.launch.base import read_outcome
    from forgather.launch.point import TRIAL_ENV, run_recorded

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="sweep")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    setting = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study": "sweep", "trial_id": trial._trial_id,
               "metric": "val/loss", "pruner": {"name": "none"}}
    monkeypatch.setenv(TRIAL_ENV, json.dumps(setting))
    run_dir = tmp_path / "0"
    assert run_recorded(run_dir, lambda callbacks: {"val/loss": float("nan"), "train/loss": 9.0}) == 0
    outcome = read_outcome(Job(0, "", [], [], run_dir))
    assert outcome.status == "diverged" and outcome.error == "val/loss is nan: these values do not train", outcome
    OptunaSweeper()._tell(study, trial, outcome)
    assert study.trials[0].state.name == "PRUNED"


def test_a_resumed_sweep_leaves_alone_a_point_still_training_from_a_killed_session(tmp_path):
    """A sweep killed by itself (kill -9 PID, not its process group) leaves its points training; its resume
    deleted the directory of such a point (one without a checkpoint yet) and started it again beside it."""
    import subprocess

    from forgather.launch.sweep import Plan
    from forgather.run_lock import DirectoryInUse

    point = tmp_path / "0"
    point.mkdir()
    (point / "output.log").write_text("training\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from forgather import run_lock\n"
                               f"with run_lock.hold({str(point)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        launcher = Recorded({"val/loss": 1.0})
        context = SweepContext(tmp_path, ["lr=1e-3"], {}, lambda point: None, ["train"], launcher, Status(1), {})
        with pytest.raises(DirectoryInUse, match=rf"^{point}: a point of this sweep trains in it now \(pid {holder.pid} on .*\); "
                                                 r"a killed session left it running: wait for it to end, or stop it \(kill PID\), then resume"):
            context.launch([Plan(0, "lr=1e-3", ovr.parse(["lr=1e-3"], {}, multirun=False)[0])])
        assert (point / "output.log").read_text() == "training\n" and launcher.batches == []
    finally:
        holder.kill()
        holder.wait()


def test_points_split_the_cores_among_those_that_run_at_once(tmp_path, monkeypatch):
    """launcher.jobs=8 gave each of a sweep's 2 points an eighth of the cores (and an Optuna search with
    sweeper.n_jobs=1 each lone trial), leaving three quarters idle."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    show = "import os; print(os.environ['OMP_NUM_THREADS'])"
    jobs = [Job(n, f"p={n}", [], [sys.executable, "-c", show], tmp_path / str(n)) for n in range(2)]
    from forgather.launch.local import LocalLauncher

    LocalLauncher(jobs=8, poll_seconds=0.02).launch(jobs, Status(2))
    assert [(tmp_path / str(n) / "output.log").read_text().strip() for n in range(2)] == ["8", "8"]


def test_a_swept_key_that_nothing_reads_is_said_once_by_the_sweep(tmp_path, capsys, monkeypatch):
    """`+lrr=1e-3,3e-3` ran identical points, the warning only in each point's output.log. (Here the launcher
    then refuses to start, so that no point trains.)"""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert run(tmp_path, "-m", *MICRO, "+lrr=1e-3,3e-3,1e-2", "launcher.gpus_per_job=1") == 2
    err = capsys.readouterr().err
    assert err.count("adds a top-level key that nothing in this config reads") == 1, err
    assert err.startswith("warning: +lrr=0.001 adds a top-level key"), err
