"""A sweep's mistakes are one line with what to do, and a resume never gives a finished point's results to
other values: misspelled Optuna settings and tags, a damaged or missing study, settings that change the
points of a resumed sweep, a misspelled sweeper.metric."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from forgather.launch.base import Outcome
from forgather.launch.basic import BasicSweeper
from forgather.launch.optuna import OptunaSweeper
from forgather.launch.sweep import write_record
from forgather.run import main

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
MICRO = ["+experiment=micro", "max_steps=2"]


def run(outputs: Path, *arguments: str) -> int:
    return main(["-p", PROJECT, "--outputs", str(outputs), *arguments])


MISTAKES = [
    (["lr=interval(1e-4,1e-2)", "sweeper=optuna", "sweeper.pruner=medain"], "sweeper.pruner=medain: give median or none ; did you mean 'median'?"),
    (["lr=interval(1e-4,1e-2)", "sweeper=optuna", "sweeper.sampler=tpr"], "sweeper.sampler=tpr: give tpe or random ; did you mean 'tpe'?"),
    (["lr=tag(lgo,interval(1e-4,1e-2))", "sweeper=optuna"], "lr=tag(lgo,interval(1e-4,1e-2)): no tag 'lgo'; did you mean 'log'? (tags: int, log)"),
    (["max_steps=tag(int,interval(1.5,3.5))", "sweeper=optuna"], "an int interval needs whole-number bounds"),
    (["lr=range(5,2)", "sweeper=optuna"], "lr=range(5,2) gives no values to sweep"),
]


@pytest.mark.parametrize(("arguments", "message"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_an_optuna_mistake_is_one_line_before_any_trial(tmp_path, capsys, arguments, message):
    assert run(tmp_path, "-m", *MICRO, *arguments) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "multirun").exists()


def test_too_few_gpus_for_one_job_says_to_lower_gpus_per_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert run(tmp_path, "-m", *MICRO, "lr=1e-3,3e-3", "launcher.gpus_per_job=2") == 2
    assert "needs 2 GPUs; 1 available (0): lower launcher.gpus_per_job, or name the GPUs" in capsys.readouterr().err


def _finished_sweep(tmp_path: Path, overrides: list[str], runner: list[str], points: list[list[str]]) -> Path:
    """A sweep directory as a session that finished `points` (each its overrides) leaves it."""
    root = tmp_path / "multirun" / "sweep"
    root.mkdir(parents=True)
    write_record(root, {"project": PROJECT, "template_path": [], "outputs": str(tmp_path), "devices": None,
                        "overrides": overrides, "runner": runner})
    for number, point in enumerate(points):
        (root / str(number) / "snapshot").mkdir(parents=True)
        (root / str(number) / "snapshot" / "overrides.yaml").write_text(yaml.safe_dump(point))
        (root / str(number) / "outcome.json").write_text(json.dumps({"status": "ok", "metrics": {"val/loss": 1.0 + number}}))
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(("damage", "message"), [
    (lambda db: db.write_text("garbage"), "optuna.db: does not read as an Optuna study (file is not a database) ; restore it from a copy of the sweep"),
    (lambda db: db.write_text(""), "optuna.db: empty, but the sweep ran trials 0, which the study numbers ; restore it"),
    (lambda db: None, "optuna.db: missing, but the sweep ran trials 0, which the study numbers ; restore it"),
], ids=["damaged", "emptied", "deleted"])
def test_a_resumed_search_without_its_study_is_refused_and_its_points_kept(tmp_path, capsys, damage, message):
    root = _finished_sweep(tmp_path, [*MICRO, "lr=interval(1e-4,1e-2)"], ["sweeper=optuna", "sweeper.n_trials=2"],
                           [[*MICRO, "lr=0.001"]])
    damage(root / "optuna.db")
    before = _snapshot(root)
    assert run(tmp_path, "--resume", str(root)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / 'optuna.db'}") and message in err and "Traceback" not in err, err
    assert _snapshot(root) == before, "the finished point and the damaged study are left as they were"


def test_a_resumed_search_under_another_study_name_names_the_one_it_ran_in(tmp_path, capsys):
    import optuna

    root = _finished_sweep(tmp_path, [*MICRO, "lr=interval(1e-4,1e-2)"], ["sweeper=optuna"], [[*MICRO, "lr=0.001"]])
    optuna.create_study(study_name="sweep", storage=f"sqlite:///{root / 'optuna.db'}")
    assert run(tmp_path, "--resume", str(root), "sweeper.study_name=swep") == 2
    assert "sweeper.study_name=swep: " in (err := capsys.readouterr().err) and "did you mean 'sweep'?" in err, err


def test_a_resume_whose_settings_change_the_points_keeps_the_finished_ones(tmp_path, capsys):
    swept = [*MICRO, "lr=1e-3,3e-3", "warmup_steps=1,2"]
    points = [[o.text for o in plan.point] for plan in BasicSweeper().plan(swept, {})]
    root = _finished_sweep(tmp_path, swept, [], points)
    before = _snapshot(root)
    assert run(tmp_path, "--resume", str(root), "sweeper.paired=[lr,warmup_steps]") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert f"error: {root / '1'}: this finished point ran lr=0.001, where the resumed sweep plans lr=0.003 ; a resume runs the points the sweep recorded" in err
    assert _snapshot(root) == before and not (root / "results.json").exists()


def test_a_basic_sweep_resumed_as_a_search_is_refused(tmp_path, capsys):
    swept = [*MICRO, "lr=1e-3,3e-3"]
    root = _finished_sweep(tmp_path, swept, [], [[o.text for o in plan.point] for plan in BasicSweeper().plan(swept, {})])
    assert run(tmp_path, "--resume", str(root), "sweeper=optuna") == 2
    assert "optuna.db: missing, but the sweep ran trials 0, 1" in capsys.readouterr().err


def test_a_misspelled_metric_is_suggested_and_stops_the_search():
    sweeper = OptunaSweeper(metric="val/los")
    misnamed = Outcome(0, "lr=1", ["lr=1"], "failed", {"val/loss": 2.0, "train/loss": 2.1})
    unvalidated = Outcome(1, "lr=1", ["lr=1"], "failed", {"train/loss": 2.1})
    assert sweeper._misnamed(misnamed) and not sweeper._misnamed(unvalidated)
    assert not OptunaSweeper()._misnamed(Outcome(2, "lr=1", ["lr=1"], "failed", {}))
    assert not OptunaSweeper()._misnamed(Outcome(3, "lr=1", ["lr=1"], "failed", {"train/loss": 2.1})), "not validating is no misspelling"


@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()], ids=["sigterm", "ctrl-c"])
@pytest.mark.parametrize("started", [True, False], ids=["points started", "none started"])
def test_a_stopped_sweep_says_how_to_continue_it_once_a_point_started(tmp_path, capsys, stop, started):
    from forgather.launch import sweep
    from forgather.launch.base import Launcher

    class Stopped(Launcher):  # what launch.local's SIGTERM handler (or a Ctrl-C) raises while points run
        def launch(self, jobs, status):
            if started:
                jobs[0].run_dir.mkdir(parents=True)
            raise stop

    with pytest.raises(type(stop)):
        sweep.run(tmp_path, Stopped(), BasicSweeper(), ["lr=1,2"], {}, lambda point: None, ["true"], resume=False)
    said = f"the sweep continues with: python -m forgather.run --resume {tmp_path}" in capsys.readouterr().err
    assert said == started
