"""Launchers: each point its own process (local, submitit's local executor, a local Ray), results files, a
killed sweep resumed, a crashing point beside a finished one. The points are the tiny micro experiment."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgather.launch.base import Job, Status
from forgather.launch.local import LocalLauncher
from forgather.run import main
from helpers.kill import alive, kill_when

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
POINTS = ("+experiment=micro", "max_steps=2", "lr=1e-3,3e-3")


def run(outputs: Path, *arguments: str) -> int:
    return main(["-p", PROJECT, "--outputs", str(outputs), *arguments])


def sweep_root(outputs: Path) -> Path:
    (root,) = (outputs / "multirun").iterdir()
    return root


def outcomes(root: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in root.glob("*/outcome.json")}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> Path:
    outputs = tmp_path_factory.mktemp("local")
    assert run(outputs, "-m", *POINTS, "launcher.jobs=2") == 0
    return sweep_root(outputs)


def test_two_jobs_run_two_points_at_once(local_sweep):
    first, second = outcomes(local_sweep)[0], outcomes(local_sweep)[1]
    assert first["status"] == second["status"] == "ok"
    assert first["started"] < second["ended"] and second["started"] < first["ended"], "the points ran one after the other"
    assert "run directory:" in (local_sweep / "0" / "output.log").read_text(), "a point's output goes to its run directory"


def test_results_hold_every_points_overrides_and_metrics(local_sweep):
    data = json.loads((local_sweep / "results.json").read_text())
    assert [(p["number"], p["status"], p["overrides"]["lr"]) for p in data["points"]] == [(0, "ok", 0.001), (1, "ok", 0.003)]
    assert data["points"][1]["overrides"]["max_steps"] == 2 and "train/loss" in data["points"][1]["metrics"]
    with open(local_sweep / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["lr"] for row in rows] == ["0.001", "0.003"]
    assert float(rows[0]["train/loss"]) == pytest.approx(data["points"][0]["metrics"]["train/loss"])


def test_tensorboard_hparams_view_covers_every_point(local_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    learning_rates = []
    for number in ("0", "1"):
        events = EventAccumulator(str(local_sweep / "tb_hparams" / number))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        learning_rates.append(HParamsPluginData.FromString(content).session_start_info.hparams["lr"].number_value)
        (scalar,) = events.Scalars("hparam/train/loss")
        assert scalar.value == pytest.approx(outcomes(local_sweep)[int(number)]["metrics"]["train/loss"])
    assert learning_rates == [0.001, 0.003]
    experiment = EventAccumulator(str(local_sweep / "tb_hparams"))
    experiment.Reload()
    assert "_hparams_/experiment" in experiment.PluginTagToContent("hparams")


def train_losses(root: Path) -> list[float]:
    return [outcomes(root)[n]["metrics"]["train/loss"] for n in (0, 1)]


def test_submitit_local_executor_gives_the_local_launchers_metrics(local_sweep, tmp_path):
    assert run(tmp_path, "-m", *POINTS, "launcher=submitit", "launcher.cluster=local") == 0
    root = sweep_root(tmp_path)
    assert train_losses(root) == pytest.approx(train_losses(local_sweep), abs=1e-5)
    assert (root / ".submitit").is_dir(), "submitit ran the jobs"


def test_a_local_ray_gives_the_local_launchers_metrics(local_sweep, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'forgather[ray]'), too heavy for the dev install")
    import ray

    try:
        assert run(tmp_path, "-m", *POINTS, "launcher=ray", "launcher.num_cpus=2") == 0
    finally:
        ray.shutdown()
    assert train_losses(sweep_root(tmp_path)) == pytest.approx(train_losses(local_sweep), abs=1e-5)


def test_a_point_that_finished_without_recording_its_outcome_resumes_to_its_metrics_in_a_moved_sweep(local_sweep, tmp_path):
    import shutil

    before = {str(p): p.read_bytes() for p in local_sweep.rglob("*") if p.is_file()}
    root = shutil.copytree(local_sweep, tmp_path / "elsewhere")
    finished = outcomes(root)[1]
    (root / "1" / "outcome.json").unlink()  # killed after training, before the outcome was written
    assert main(["--resume", str(root)]) == 0
    resumed = outcomes(root)[1]
    assert resumed["status"] == "ok" and resumed["metrics"] == pytest.approx(finished["metrics"])
    assert {str(p): p.read_bytes() for p in local_sweep.rglob("*") if p.is_file()} == before, "the sweep it was copied from is left alone"


def test_a_killed_sweep_resumes_only_its_unfinished_points(tmp_path, capsys):
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro", "max_steps=2", "lr=1e-3,2e-3,3e-3"]
    # Its own session: the kill takes the sweep and the point it is running, as a closed terminal would.
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(sweep, lambda: any(tmp_path.glob("multirun/*/0/outcome.json")), 240, "the sweep ended before its first point",
              group=True)
    root = sweep_root(tmp_path)
    first = (root / "0" / "outcome.json").read_text()
    assert set(outcomes(root)) == {0}
    # A launcher setting may change on resume: the two unfinished points run at once.
    assert main(["--resume", str(root), "launcher.jobs=2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {root}: 1 finished point kept" in out
    assert "[sweep 1/3]" not in out and "[sweep 2/3] lr=0.002" in out and "[sweep 3/3] lr=0.003" in out
    assert (root / "0" / "outcome.json").read_text() == first, "a finished point is kept as it was"
    assert {n: o["status"] for n, o in outcomes(root).items()} == {0: "ok", 1: "ok", 2: "ok"}
    assert len(json.loads((root / "results.json").read_text())["points"]) == 3
    assert main(["--resume", str(root), "lr=1"]) == 2
    assert "only launcher and sweeper settings may change" in capsys.readouterr().err


def test_a_point_whose_sweep_is_killed_alone_checkpoints_and_stops(tmp_path):
    # Before: a sweep killed outright (the OOM killer, submitit's SIGKILL after a Ctrl-C) left its running point
    # training on, an orphan holding its GPUs and its run directory's lock.
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro",
               "scheduler=constant", "max_steps=300", "lr=1e-3,2e-3"]
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    points = kill_when(sweep, lambda: any(tmp_path.glob("multirun/*/0/checkpoints/epoch=*.ckpt")), 240,
                       "the sweep ended before its first point checkpointed")
    assert len(points) == 1 and alive(points, within=60) == [], "the point outlived its sweep"
    root = sweep_root(tmp_path)
    stopped = int((root / "0" / "output.log").read_text().split("stopped: SIGTERM at step ")[1].split(":")[0])
    assert 0 < stopped < 300 and (root / "0" / "checkpoints" / "last.ckpt").is_file()
    assert not (root / "1").exists()  # the sweep died before it


def test_a_point_started_after_its_launcher_died_stops_and_one_behind_a_wrapper_runs():
    from forgather.launch.base import LAUNCHER_PID_ENV

    code = "from forgather.launch.point import end_with_launcher; end_with_launcher(); print('ran')"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = subprocess.run([sys.executable, "-c", code], env={**os.environ, LAUNCHER_PID_ENV: str(gone.pid)},
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode == -signal.SIGTERM and orphan.stdout == ""
    # The launcher alive but not the parent (a wrapper between them): the point runs
    wrapped = subprocess.run([sys.executable, "-c", code], env={**os.environ, LAUNCHER_PID_ENV: str(os.getppid())},
                             capture_output=True, text=True, timeout=60)
    assert wrapped.returncode == 0 and wrapped.stdout == "ran\n"


def fake_job(tmp_path: Path, number: int, code: str) -> Job:
    return Job(number, f"p={number}", [f"p={number}"], [sys.executable, "-c", code], tmp_path / str(number))


def test_a_crashing_point_is_reported_and_the_others_finish(tmp_path):
    finished = (
        "import json, os; d = os.environ['RUN_DIR']; "
        "open(os.path.join(d, 'outcome.json'), 'w').write(json.dumps({'status': 'ok', 'metrics': {'val/loss': 1.5}}))"
    )
    crash = fake_job(tmp_path, 0, "import os, signal; print('going down'); os.kill(os.getpid(), signal.SIGKILL)")
    ok = fake_job(tmp_path, 1, finished)
    ok.env = {"RUN_DIR": str(ok.run_dir)}
    crashed, fine = LocalLauncher(jobs=1).launch([crash, ok], Status(2))
    assert crashed.status == "failed" and "killed by signal 9" in crashed.error and "going down" in crashed.error
    assert fine.status == "ok" and fine.metrics == {"val/loss": 1.5}


def test_gpus_per_job_gives_each_running_point_its_own_gpus(tmp_path):
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs = [fake_job(tmp_path, n, show) for n in range(3)]
    LocalLauncher(jobs=2, gpus_per_job=2, gpus="0,1,2,3").launch(jobs, Status(3))
    seen = [(tmp_path / str(n) / "output.log").read_text().strip() for n in range(3)]
    assert seen[0] != seen[1] and all(len(s.split(",")) == 2 for s in seen) and set(",".join(seen).split(",")) <= {"0", "1", "2", "3"}
    with pytest.raises(Exception, match="needs 6 GPUs; 4 available"):
        LocalLauncher(jobs=3, gpus_per_job=2, gpus="0,1,2,3").check(5)


def test_a_terminal_shows_one_live_line_per_point(tmp_path):
    import io

    from rich.console import Console

    screen = io.StringIO()
    jobs = [fake_job(tmp_path, n, "import time; time.sleep(0.5)") for n in range(2)]
    with Status(2, Console(file=screen, force_terminal=True, width=100)) as status:
        for job in jobs:
            status.add(job.number, job.label)
        LocalLauncher(jobs=2).launch(jobs, status)
    assert "running" in screen.getvalue(), "the live display showed the points running"
    final = io.StringIO()
    Console(file=final, width=400).print(status.render())
    lines = [line.split(maxsplit=2) for line in final.getvalue().splitlines()]
    assert [line[:2] for line in lines] == [["0", "p=0"], ["1", "p=1"]]
    assert all(line[2].startswith("failed: the point's process ended (exit status 0) without recording an outcome") for line in lines)


def test_sigterm_to_a_sweep_stops_its_running_points(tmp_path):
    import psutil

    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro", "max_steps=500", "lr=1e-3,3e-3", "launcher.jobs=2"]
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(sweep.pid).children()) < 2:
            assert sweep.poll() is None and time.monotonic() < deadline, "the sweep did not start its points"
            time.sleep(0.05)
        points = psutil.Process(sweep.pid).children()
        sweep.terminate()
        assert sweep.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs(points, timeout=30)
        assert alive == [], "a point outlived its sweep"
    finally:
        sweep.kill()


def test_a_sweep_stopped_by_sigterm_continues_its_points_from_their_checkpoints(tmp_path, capsys):
    import psutil

    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro", "max_steps=300", "lr=1e-3,3e-3", "launcher.jobs=2"]
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # Both points training, each past a periodic checkpoint (micro writes one every 4 steps)
        while {p.parent.parent.name for p in tmp_path.glob("multirun/*/*/checkpoints/epoch=*.ckpt")} != {"0", "1"}:
            assert sweep.poll() is None and time.monotonic() < deadline, "the sweep did not start training its points"
            time.sleep(0.05)
        points = psutil.Process(sweep.pid).children()
        sweep.terminate()  # the launcher passes it on to the points
        assert sweep.wait(timeout=60) != 0
        psutil.wait_procs(points, timeout=30)
    finally:
        sweep.kill()
    root = sweep_root(tmp_path)
    stopped = outcomes(root)
    assert {n: o["status"] for n, o in stopped.items()} == {0: "failed", 1: "failed"}
    assert all(o["error"].startswith("JobStopped: SIGTERM at step ") for o in stopped.values()), stopped
    steps = {n: int(o["error"].split("at step ")[1].split(":")[0]) for n, o in stopped.items()}
    assert all(0 < step < 300 for step in steps.values())

    assert main(["--resume", str(root)]) == 0
    for number, step in steps.items():
        log = (root / str(number) / "output.log").read_text()
        assert f"resuming {root / str(number)} from last.ckpt (step {step})" in log
        with open(root / str(number) / "csv" / "metrics.csv", newline="") as file:
            trained = [int(row["step"]) for row in csv.DictReader(file) if row["train/loss"]]
        assert trained == list(range(300)), "each step once: the steps before the stop kept, the rest trained on"
    assert {n: o["status"] for n, o in outcomes(root).items()} == {0: "ok", 1: "ok"}


def test_a_preempted_submitit_job_checkpoints_its_point_and_is_requeued_to_continue_it(tmp_path):
    """submitit's local executor stands in for SLURM: its worker gets the signal SLURM sends before a time limit
    or a preemption (USR2). The point checkpoints, the job is requeued, the point continues."""
    import psutil
    import submitit

    from forgather.launch.point import SWEEP_POINT_ENV
    from forgather.launch.submitit import PointJob

    run_dir = tmp_path / "0"
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "+experiment=micro", "scheduler=constant", "max_steps=300"]
    job = Job(0, "micro", [], command, run_dir, {SWEEP_POINT_ENV: str(run_dir)})
    executor = submitit.AutoExecutor(folder=tmp_path / ".submitit", cluster="local")
    executor.update_parameters(timeout_min=10)
    handle = executor.submit(PointJob(), job)
    try:
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("checkpoints/epoch=*.ckpt")):
            assert not handle.done() and time.monotonic() < deadline, "the point did not start training"
            time.sleep(0.05)
        (worker,) = psutil.Process(handle._process.pid).children()  # the local executor's controller runs it
        worker.send_signal(signal.SIGUSR2)
        assert handle.result() == 0
    finally:
        handle.cancel(check=False)
    log = (run_dir / "output.log").read_text()
    stopped = int(log.split("stopped: SIGTERM at step ")[1].split(":")[0])
    assert 0 < stopped < 300
    assert f"resuming {run_dir} from last.ckpt (step {stopped})" in log
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        assert [int(row["step"]) for row in csv.DictReader(file) if row["train/loss"]] == list(range(300))
    assert json.loads((run_dir / "outcome.json").read_text())["status"] == "ok"


def test_points_train_on_the_gpus_the_sweep_or_its_launcher_gives_them():
    import argparse

    from forgather.run import Runner, build_parser

    args: argparse.Namespace = build_parser().parse_intermixed_args(["-p", PROJECT, "-d", "2,3", "-m"])
    runner = Runner.create(args, [])
    def devices(command: list[str]) -> str:
        return command[command.index("-d") + 1]

    assert devices(runner.point_command()) == "2,3", "every point trains on the sweep's -d GPUs"
    assert devices(runner.point_command(gpus_per_point=1)) == "0", "a point sees its own GPU as device 0"
    assert runner.sweep_record()["devices"] == "2,3", "a resumed sweep keeps -d"
