"""Sweepers: Optuna's search (pruning, the best trial, a study resumed from its SQLite file), paired axes,
settings from the template, and every bad input refused before any point starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgather import overrides as ovr
from forgather.launch import settings
from forgather.launch.base import Job, Launcher, Outcome, Status
from forgather.launch.basic import BasicSweeper
from forgather.run import main
from helpers.kill import kill_when

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
MICRO = ("+experiment=micro", "max_steps=4", "val_check_interval=2")


def run(outputs: Path, *arguments: str) -> int:
    return main(["-p", PROJECT, "--outputs", str(outputs), *arguments])


def statuses(root: Path) -> dict[int, str]:
    return {int(p.parent.name): json.loads(p.read_text())["status"] for p in root.glob("*/outcome.json")}


# -- Optuna ------------------------------------------------------------------------------------------------


def test_optuna_prunes_poor_trials_and_records_the_best(tmp_path, capsys):
    # Three trials are the fewest that prune: the first two run at once and finish (the pruner's two startup
    # trials); the seeded sampler's third is worse than their median at step 2.
    arguments = ["-m", *MICRO, "lr=tag(log, interval(1e-5, 1e-1))", "sweeper=optuna", "sweeper.n_trials=3", "sweeper.n_jobs=2", "launcher.jobs=2"]
    assert run(tmp_path, *arguments) == 0
    out = capsys.readouterr().out
    (root,) = (tmp_path / "multirun").iterdir()
    found = statuses(root)
    assert sorted(found) == list(range(3)) and "pruned" in found.values() and "ok" in found.values()
    results = json.loads((root / "results.json").read_text())
    finished = {p["number"]: p["metrics"]["val/loss"] for p in results["points"] if p["status"] == "ok"}
    best = results["best"]
    assert best["value"] == pytest.approx(min(finished.values())) and finished[best["number"]] == pytest.approx(best["value"])
    assert f"best trial: #{best['number']} val/loss=" in out
    pruned = next(p for p in results["points"] if p["status"] == "pruned")
    reported = json.loads((root / str(pruned["number"]) / "outcome.json").read_text())["intermediate"]
    assert list(reported) == ["2"], "a pruned trial stops at the validation that pruned it"
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{root / 'optuna.db'}")
    assert study.best_trial.number == best["number"] and len(study.trials) == 3


@pytest.mark.slow  # a killed sweep's resume runs by default: tests/test_launch.py
def test_an_interrupted_optuna_search_resumes_from_its_study(tmp_path, capsys):
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro", "max_steps=2", "val_check_interval=2"]
    command += ["lr=tag(log, interval(1e-4, 1e-2))", "sweeper=optuna", "sweeper.n_trials=2", "sweeper.pruner=none"]
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Killed while trial 1 runs.
    kill_when(search, lambda: any(tmp_path.glob("multirun/*/0/outcome.json")) and any(tmp_path.glob("multirun/*/1/output.log")),
              240, "the search ended before its second trial", group=True)
    (root,) = (tmp_path / "multirun").iterdir()
    kept = (root / "0" / "outcome.json").read_text()
    assert main(["--resume", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[sweep 1/" not in out
    assert (root / "0" / "outcome.json").read_text() == kept
    import optuna

    trials = optuna.load_study(study_name="sweep", storage=f"sqlite:///{root / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params, "the interrupted trial is tried again with its values"
    assert statuses(root) == {0: "ok", 2: "ok"}
    rows = [line for line in out.splitlines() if line.startswith("│ 0 ")]
    assert rows and "lr=" in rows[0], "a kept trial's row names its values"


@pytest.mark.slow  # the take-over itself runs by default, without training: the test below
def test_an_optuna_search_stopped_by_sigterm_continues_its_trial_from_the_checkpoint(tmp_path, capsys):
    import csv

    import optuna
    import psutil

    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro", "max_steps=200", "val_check_interval=20"]
    command += ["lr=tag(log, interval(1e-4, 1e-2))", "sweeper=optuna", "sweeper.n_trials=1", "sweeper.pruner=none"]
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(int(p.stem.split("step=")[1]) > 40 for p in tmp_path.glob("multirun/*/0/checkpoints/epoch=*.ckpt")):
            assert search.poll() is None and time.monotonic() < deadline, "the search did not start training its trial"
            time.sleep(0.05)
        points = psutil.Process(search.pid).children()
        search.terminate()  # passed on to the trial's point, which checkpoints the step it is in
        assert search.wait(timeout=60) != 0
        psutil.wait_procs(points, timeout=30)
    finally:
        search.kill()
    (root,) = (tmp_path / "multirun").iterdir()
    stopped = json.loads((root / "0" / "outcome.json").read_text())["error"]
    step = int(stopped.split("at step ")[1].split(":")[0])

    assert main(["--resume", str(root)]) == 0
    assert f"trial 1 continues trial 0 from its checkpoint at step {step}" in capsys.readouterr().out
    assert not (root / "0").exists()
    assert f"resuming {root / '1'} from last.ckpt (step {step})" in (root / "1" / "output.log").read_text()
    with open(root / "1" / "csv" / "metrics.csv", newline="") as file:
        trained = [int(row["step"]) for row in csv.DictReader(file) if row["train/loss"]]
    assert trained == list(range(200)), "each step once: the steps before the stop kept, the rest trained on"
    first, second = optuna.load_study(study_name="sweep", storage=f"sqlite:///{root / 'optuna.db'}").trials
    assert (first.state.name, second.state.name) == ("FAIL", "COMPLETE") and second.params == first.params
    # Every validation's value, the one the stop ran at its step (Lightning validates when it stops) too.
    assert set(second.intermediate_values) - {step} == set(range(20, 201, 20))
    assert {s: v for s, v in second.intermediate_values.items() if s <= step} == {s: v for s, v in first.intermediate_values.items() if s <= step}
    assert statuses(root) == {1: "ok"}
    assert "already reported" not in (root / "1" / "output.log").read_text()


class Recorded(Launcher):
    """Runs nothing: each job ends ok with val/loss 1.0, and is kept to be looked at."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def launch(self, jobs: list[Job], status: Status) -> list[Outcome]:
        self.jobs += jobs
        return [Outcome(job.number, job.label, job.overrides, "ok", {"val/loss": 1.0}) for job in jobs]


def test_a_resumed_study_continues_an_interrupted_trial_from_its_checkpoint_and_asks_the_queued_ones(tmp_path, capsys):
    import optuna
    import torch

    from forgather.launch.optuna import CONTINUES, OptunaSweeper
    from forgather.launch.sweep import SweepContext

    # What a session killed mid-sweep left: trial 0 was running (stopped at step 8 with a checkpoint, having
    # reported steps 4 and 8, then 12 after it), trial 1 was queued and not yet asked.
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="sweep")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for step, value in ((4, 5.0), (8, 4.0), (12, 3.5)):
        trial.report(value, step)
    study.enqueue_trial({"lr": 1e-3}, user_attrs={CONTINUES: 7})  # trial 7's directory is gone: starts over
    (tmp_path / "0" / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 8}, tmp_path / "0" / "checkpoints" / "last.ckpt")
    (tmp_path / "0" / "snapshot").mkdir()
    lr = repr(trial.params["lr"])
    (tmp_path / "0" / "snapshot" / "overrides.yaml").write_text(yaml.safe_dump(["max_steps=4", f"lr={lr}"]))

    launcher = Recorded()
    context = SweepContext(tmp_path, ["max_steps=4", "lr=tag(log, interval(1e-4, 1e-2))"], {}, lambda point: None, ["train"], launcher, Status(0), {})
    OptunaSweeper(n_trials=3, pruner="none").run(context)

    trials = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[1].params == {"lr": 1e-3} and trials[2].params == trials[0].params
    assert trials[2].user_attrs[CONTINUES] == 0 and trials[2].intermediate_values == {4: 5.0, 8: 4.0}
    assert not (tmp_path / "0").exists() and (tmp_path / "2" / "checkpoints" / "last.ckpt").is_file()
    assert [job.number for job in launcher.jobs] == [1, 2, 3] and launcher.jobs[1].overrides == ["max_steps=4", f"lr={lr}"]
    assert "trial 2 continues trial 0 from its checkpoint at step 8" in capsys.readouterr().out


# -- paired axes -------------------------------------------------------------------------------------------


def test_paired_axes_sweep_together_and_the_rest_as_a_product():
    plans = BasicSweeper(paired=["lr", "warmup_steps"]).plan(["lr=1e-3,3e-4", "seed=1,2", "warmup_steps=10,20"], {})
    assert [plan.label for plan in plans] == [
        "lr=0.001 warmup_steps=10 seed=1",
        "lr=0.001 warmup_steps=10 seed=2",
        "lr=0.0003 warmup_steps=20 seed=1",
        "lr=0.0003 warmup_steps=20 seed=2",
    ]


def test_paired_axes_of_different_lengths_are_refused(tmp_path, capsys):
    assert run(tmp_path, "-m", *MICRO, "lr=1e-3,3e-4", "warmup_steps=1,2,3", "sweeper.paired=[lr,warmup_steps]") == 2
    assert "paired axes need as many values each (lr has 2, warmup_steps has 3)" in capsys.readouterr().err
    assert not (tmp_path / "multirun").exists()


def test_paired_points_run_with_their_pair_of_values(tmp_path):
    assert run(tmp_path, "-m", "+experiment=micro", "max_steps=2", "lr=1e-3,3e-3", "warmup_steps=1,2", "sweeper.paired=[lr,warmup_steps]", "launcher.jobs=2") == 0
    (root,) = (tmp_path / "multirun").iterdir()
    points = json.loads((root / "results.json").read_text())["points"]
    assert [(p["overrides"]["lr"], p["overrides"]["warmup_steps"]) for p in points] == [(0.001, 1), (0.003, 2)]


# -- settings from the template ----------------------------------------------------------------------------


def test_the_template_chooses_launcher_and_sweeper_and_the_command_line_wins():
    search_path = [str(Path(settings.__file__).parents[2] / "conf")]
    template = {"launcher": {"name": "local", "jobs": 3}, "sweeper": {"name": "basic", "params": {"lr": "1e-3,3e-3"}}}
    chosen = settings.resolve(search_path, [], template)
    assert chosen.launcher.jobs == 3 and chosen.params == ["lr=1e-3,3e-3"]
    assert settings.resolve(search_path, ["launcher.jobs=2"], template).build("launcher").jobs == 2
    with pytest.raises(ovr.OverrideError, match=r"hydra.launcher.jbos=2 in the experiment: no key 'launcher.jbos'.*did you mean 'launcher.jobs'"):
        settings.resolve(search_path, [], {"launcher": {"jbos": 2}})


# -- bad input: one line, before any point starts ----------------------------------------------------------

BAD = [
    (["launcher=nope"], "launcher=nope: no launcher 'nope' (options: local, ray, submitit)"),
    (["sweeper=optuan"], "sweeper=optuan: no sweeper 'optuan'; did you mean 'optuna'"),
    (["launcher=slurm"], "launcher=slurm: no launcher 'slurm'; launcher=submitit submits to Slurm (options: local, "
                         "ray, submitit)"),
    (["launcher=parallel"], "launcher=parallel: no launcher 'parallel'; launcher=local runs points in parallel on this "
                            "machine (launcher.jobs=N at a time) (options: local, ray, submitit)"),
    (["launcher=joblib"], "launcher=joblib: no launcher 'joblib'; launcher=local runs points in parallel"),
    (["launcher=submitit_slurm"], "launcher=submitit_slurm: no launcher 'submitit_slurm'; did you mean 'submitit'"),
    (["sweeper=grid"], "sweeper=grid: no sweeper 'grid'; sweeper=basic enumerates every combination of the swept values"),
    (["sweeper=random"], "sweeper=random: no sweeper 'random'; sweeper=optuna with sweeper.sampler=random"),
    (["launcher=grid"], "launcher=grid: no launcher 'grid' (options: local, ray, submitit)"),
    (["launcher.jbos=2"], "launcher.jbos=2: no key 'launcher.jbos' in the config; did you mean 'launcher.jobs'"),
    (["launcher.jobs=two"], "launcher.jobs=two: forgather.launch.local:LocalLauncher takes jobs: int; got str 'two'"),
    (["launcher=submitit", "launcher.timeout_min=1h"], "launcher.timeout_min=1h: forgather.launch.submitit:SubmititLauncher takes timeout_min: int; got str '1h'"),
    (["launcher=submitit", "launcher.cluster=nope"], "launcher.cluster=nope: AutoExecutor doesn't know any executor named nope"),
    (["launcher=ray", "launcher.address=127.0.0.1:1"], "launcher.address=127.0.0.1:1: no Ray cluster answers there"),
    (["lr=tag(log, interval(1e-4, 1e-2))"], "interval() and tag() describe a search space, which the basic sweeper cannot enumerate: add sweeper=optuna"),
    (["optimizer=glob(ada*)", "sweeper=optuna"], "optimizer=glob(ada*): glob() enumerates a group's options for the basic sweeper; with sweeper=optuna write choice(a,b,...)"),
    (["lrr=interval(1e-4, 1e-2)", "sweeper=optuna"], "no key 'lrr' in the config; did you mean 'lr'"),
    (["lrr=1e-3,3e-3"], "lrr=0.001: no key 'lrr' in the config; did you mean 'lr'"),
    (["sweeper=optuna", "sweeper.direction=down", "lr=1e-3,3e-3"], "sweeper.direction=down: give minimize or maximize"),
    (["sweeper.paired=[lr,seed]", "lr=1e-3,3e-3"], "sweeper.paired names seed, which the command line does not sweep"),
    (["sweeper.n_trials=3", "lr=1e-3,3e-3"], "sweeper.n_trials=3: n_trials is a setting of sweeper=optuna, not of "
                                             "sweeper=basic; add sweeper=optuna"),
    (["launcher.timeout_min=5", "lr=1e-3,3e-3"], "timeout_min is a setting of launcher=submitit, not of launcher=local"),
    (["sweeper.n_trails=3", "lr=1e-3,3e-3"], "sweeper.n_trails=3: no setting 'n_trails' in sweeper=basic; did you mean "
                                             "sweeper.n_trials, a setting of sweeper=optuna (add sweeper=optuna)?"),
    (["sweeper.pared=true", "lr=1e-3,3e-3"], "did you mean 'sweeper.paired'"),
    (["sweeper=optuna", "sweeper.n_trials=0", "lr=tag(log, interval(1e-4, 1e-2))"], "error: sweeper.n_trials=0: give 1 or more\n"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sweep_input_is_one_line_before_any_point_starts(tmp_path, capsys, arguments, message):
    assert run(tmp_path, "-m", *MICRO, *arguments) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "multirun").exists(), "nothing is left behind"


def test_launcher_settings_without_multirun_are_an_error(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "launcher.jobs=2") == 2
    assert "launcher.jobs=2: launchers and sweepers run sweeps: add -m" in capsys.readouterr().err


def test_cfg_prints_the_paired_points(capsys):
    assert main(["-p", PROJECT, "--cfg", "-m", "+experiment=micro", "lr=1e-3,3e-3", "warmup_steps=1,2", "sweeper.paired=[lr,warmup_steps]"]) == 0
    runs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# run")]
    assert runs == ["# run 0: experiment=micro lr=0.001 warmup_steps=1", "# run 1: experiment=micro lr=0.003 warmup_steps=2"]
    assert main(["-p", PROJECT, "--cfg", "-m", "+experiment=micro", "lr=interval(1e-4,1e-2)", "sweeper=optuna"]) == 2
    assert "its points are chosen as the search runs" in capsys.readouterr().err


def test_a_template_chooses_the_launcher_and_the_swept_values(tmp_path):
    project = tmp_path / "project"
    (project / "templates" / "configs").mkdir(parents=True)
    (project / "meta.yaml").write_text("name: templated\n")
    (project / "templates" / "configs" / "swept.yaml").write_text(
        "-- extends 'configs/micro.yaml'\n"
        "[targets]\n"
        "== super()\n"
        "hydra:\n"
        "    launcher: {name: local, jobs: 2}\n"
        "    sweeper: {params: {lr: '1e-3,3e-3'}}\n"
    )
    arguments = ["-p", str(project), "--template-path", os.path.join(PROJECT, "templates"), "--outputs", str(tmp_path)]
    assert main([*arguments, "-m", "+experiment=swept", "max_steps=2"]) == 0
    (root,) = (tmp_path / "multirun").iterdir()
    points = json.loads((root / "results.json").read_text())["points"]
    assert [p["overrides"]["lr"] for p in points] == [0.001, 0.003]
    first, second = (json.loads((root / n / "outcome.json").read_text()) for n in ("0", "1"))
    assert first["started"] < second["ended"] and second["started"] < first["ended"], "the template's launcher.jobs=2 ran both at once"
    assert "hydra" not in yaml.safe_load((root / "0" / "snapshot" / "config.yaml").read_text()), "the runner's settings are not the job's"


def test_a_trial_without_the_metric_fails_with_the_metrics_it_logged(tmp_path, capsys):
    assert run(tmp_path, "-m", "+experiment=micro", "max_steps=2", "lr=choice(1e-3)", "sweeper=optuna", "sweeper.n_trials=1") == 1
    captured = capsys.readouterr()
    assert "[sweep 1/1] failed: the point logged no val/loss (sweeper.metric); it logged train/grad_norm" in captured.out
    assert "choose one with sweeper.metric=NAME" in captured.err


def test_a_sweep_record_and_its_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """What `--resume` reads (the record) and what a user reads (results.json, results.csv): a kill while one
    is rewritten leaves the previous one whole, and no temporary file beside it."""
    from pathlib import Path

    from forgather.launch.base import Outcome
    from forgather.launch.results import write_results
    from forgather.launch.sweep import read_record, write_record

    write_record(tmp_path, {"overrides": ["lr=1"]})
    outcome = Outcome(number=0, label="lr=1", overrides=["lr=1"], status="ok", metrics={"val/loss": 2.0})
    write_results(tmp_path, [outcome], {})
    before = {name: (tmp_path / name).read_bytes() for name in ("results.json", "results.csv")}
    real = Path.write_text

    def killed(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        write_record(tmp_path, {"overrides": ["lr=1", "lr=2"], "runner": ["--seed", "3"]})
    with pytest.raises(KeyboardInterrupt):
        write_results(tmp_path, [outcome, outcome], {"best": 0})
    monkeypatch.undo()
    assert read_record(tmp_path) == {"overrides": ["lr=1"]}
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_damaged_sweep_record_or_point_outcome_is_named_with_what_to_do(tmp_path, capsys):
    """A multirun.yaml emptied or turned into a list was a TypeError traceback, one that does not parse a YAML
    traceback, and an emptied outcome.json a JSON error naming no file."""
    from forgather.launch.sweep import kept_outcomes

    root = tmp_path / "multirun" / "sweep"
    root.mkdir(parents=True)
    record = root / "multirun.yaml"
    for text, says in (("", "is empty, where Forgather wrote a mapping"), ("- a\n", "is a list, where Forgather wrote a mapping"),
                       ("overrides: [a\n", "is not valid YAML")):
        record.write_text(text)
        assert run(tmp_path, "--resume", str(root)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {record}") and says in err and f"restore it from a copy of the sweep: it records what --resume {root} runs" in err
    outcome = root / "0" / "outcome.json"
    outcome.parent.mkdir()
    outcome.write_text('{"status": "ok", "metr')
    with pytest.raises(ValueError, match=f"^{outcome}:1: the recorded outcome.json is not valid JSON .*; delete it to run the point again$"):
        kept_outcomes(root)
