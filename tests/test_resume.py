"""--resume keeps a run whole: its metric history, an exact continuation wherever training stopped, a model
export that is its own; a run goes where `output_dir=` says and tells where it is."""

from __future__ import annotations

import contextlib
import csv
import errno
import itertools
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from forgather.callbacks.job_control import ControlServer, PendingCommand
from forgather.callbacks.model_export import ExportFailed, ExportModel, read_record
from forgather.lightning.csv_logger import CSVLogger
from forgather.run import checkpoint_step, main
from test_run import finished, run, run_dirs, train_losses

MICRO = ("+experiment=micro", "scheduler=constant")


def history(run_dir: Path) -> list[dict[str, str]]:
    """Every row of csv/metrics.csv in order, without the wall-clock throughput."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k != "train/tokens_per_s"} for row in csv.DictReader(file)]


def train_steps(run_dir: Path) -> list[int]:
    return [int(row["step"]) for row in history(run_dir) if row["train/loss"]]


def files_state(*roots: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under the roots with its modification time and content."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """`forgather control stop` arriving at `step`: the job's server hands the training loop a stop there
    (JobControl asks its server once per optimizer step, from step 1)."""
    calls = itertools.count(1)

    def take(self):
        if next(calls) != step:
            return None
        pending = PendingCommand("stop")
        pending.replied.set()  # no client waits for the reply
        return pending

    monkeypatch.setattr(ControlServer, "take", take)


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, *signums: int) -> None:
    """The signals arriving during `step` (JobControl asks its server once per optimizer step, from step 1)."""
    calls = itertools.count(1)

    def take(self):
        if next(calls) == step:
            for signum in signums:
                signal.raise_signal(signum)
        return None

    monkeypatch.setattr(ControlServer, "take", take)


def disk_full(model, path) -> None:
    """Writing the weights fills the disk."""
    Path(path).write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 16-step run."""
    return finished(tmp_path_factory.mktemp("reference"), *MICRO, "max_steps=16")


def test_control_stop_then_resume_continues_the_same_run(reference, tmp_path, monkeypatch):
    # Step 3 is before the first checkpoint step (4): the checkpoint written as fit ends is the newest.
    stop_at(monkeypatch, 3)
    assert run(tmp_path, *MICRO, "max_steps=5000") == 0
    monkeypatch.undo()
    (stopped,) = run_dirs(tmp_path / "outputs")
    assert main(["--resume", str(stopped), "max_steps=16"]) == 0
    assert train_steps(stopped) == list(range(16)), "one row per step, the steps before the stop kept"
    assert train_losses(stopped) == train_losses(reference)


def test_sigterm_checkpoints_the_step_it_arrives_in_and_resume_continues_the_same_run(reference, tmp_path, monkeypatch, capsys):
    # Step 3 is before the first periodic checkpoint (4): without the signal's checkpoint nothing would be kept.
    handler = signal.getsignal(signal.SIGTERM)
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert run(tmp_path, *MICRO, "max_steps=5000") == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler, "the handler is put back"
    (stopped,) = run_dirs(tmp_path / "outputs")
    checkpoint = stopped / "checkpoints" / "last.ckpt"  # the run's ModelCheckpoint writes the step: no second copy
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.ckpt"]
    err = capsys.readouterr().err
    assert f"stopped: SIGTERM at step 3: checkpoint saved: {checkpoint} ; continue with: python -m forgather.run --resume {stopped}\n" in err
    assert read_record(stopped) is None and not (tmp_path / "output_models").exists(), "an interrupted run exports nothing"
    assert main(["--resume", str(stopped), "max_steps=16"]) == 0
    assert train_steps(stopped) == list(range(16))
    assert train_losses(stopped) == train_losses(reference)


def test_auto_resume_starts_a_run_continues_it_after_a_stop_and_leaves_it_finished(reference, tmp_path, monkeypatch, capsys):
    # What a job script that a scheduler requeues runs every time.
    line = ("--auto-resume", *MICRO, "max_steps=16", f"output_dir={tmp_path / 'job'}")
    signal_at(monkeypatch, 3, signal.SIGTERM)  # a preemption during step 3
    assert run(tmp_path, *line) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run(tmp_path, *line) == 0
    assert f"resuming {tmp_path / 'job'} from last.ckpt (step 3)" in capsys.readouterr().out
    assert train_steps(tmp_path / "job") == list(range(16))
    assert train_losses(tmp_path / "job") == train_losses(reference)
    before = files_state(tmp_path / "job")
    assert run(tmp_path, *line) == 0
    assert "already finished at step 16" in capsys.readouterr().out
    assert files_state(tmp_path / "job") == before


def test_auto_resume_starts_over_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    line = ("--auto-resume", *MICRO, "max_steps=6", f"output_dir={tmp_path / 'job'}")
    assert run(tmp_path, *line) == 0
    shutil.rmtree(tmp_path / "job" / "checkpoints")  # as a kill before the first checkpoint leaves it
    capsys.readouterr()
    assert run(tmp_path, *line) == 0
    assert f"{tmp_path / 'job'}: stopped before its first checkpoint; starting it over" in capsys.readouterr().out
    assert train_steps(tmp_path / "job") == list(range(6))


@pytest.mark.parametrize("arguments, message", [
    ((*MICRO, "max_steps=6"), "--auto-resume needs output_dir=DIR"),
    ((*MICRO, "max_steps=8", "output_dir=JOB"), "--auto-resume: JOB holds a run started with other overrides (+experiment=micro scheduler=constant max_steps=6 output_dir=JOB)"),
])
def test_auto_resume_mistakes_are_one_line(tmp_path, capsys, arguments, message):
    assert run(tmp_path, *MICRO, "max_steps=6", f"output_dir={tmp_path / 'JOB'}") == 0
    capsys.readouterr()
    arguments = [a.replace("JOB", str(tmp_path / "JOB")) for a in arguments]
    assert run(tmp_path, "--auto-resume", *arguments) == 2
    assert capsys.readouterr().err.startswith("error: " + message.replace("JOB", str(tmp_path / "JOB")))


def test_auto_resume_names_a_damaged_or_missing_record_of_the_overrides(tmp_path, capsys):
    line = ("--auto-resume", *MICRO, "max_steps=6", f"output_dir={tmp_path / 'JOB'}")
    assert run(tmp_path, *line) == 0
    recorded = tmp_path / "JOB" / "snapshot" / "overrides.yaml"
    for damage, message in ((lambda: recorded.write_text("- a\n- [b\n"), f"{recorded}:3: the recorded overrides.yaml is not valid YAML"),
                            (lambda: recorded.write_text("a: b\n"), f"{recorded}: the recorded overrides.yaml is a mapping, where Forgather wrote a list"),
                            (recorded.unlink, f"{recorded}: missing, the snapshot is incomplete")):
        damage()
        capsys.readouterr()
        assert run(tmp_path, *line) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")


def test_a_second_ctrl_c_stops_at_once_with_nothing_saved(tmp_path, monkeypatch):
    signal_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt
        run(tmp_path, *MICRO, "max_steps=5000")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    (stopped,) = run_dirs(tmp_path / "outputs")
    assert not (stopped / "checkpoints").exists() or not any((stopped / "checkpoints").iterdir())


def test_keep_checkpoints_keeps_the_newest_step_checkpoints_also_across_a_resume(tmp_path):
    assert run(tmp_path, *MICRO, "max_steps=22", "keep_checkpoints=2") == 0  # a checkpoint every 4 steps
    (run_dir,) = run_dirs(tmp_path / "outputs")
    names = lambda: sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names() == ["epoch=0-step=16.ckpt", "epoch=0-step=20.ckpt", "last.ckpt"]
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 22
    assert main(["--resume", str(run_dir), "max_steps=30"]) == 0
    assert names() == ["epoch=0-step=24.ckpt", "epoch=0-step=28.ckpt", "last.ckpt"]


@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_run_moved_or_copied_elsewhere_resumes_with_its_checkpoints_kept_and_pruned(tmp_path, how):
    assert run(tmp_path, *MICRO, "max_steps=22", "keep_checkpoints=2") == 0
    (original,) = run_dirs(tmp_path / "outputs")
    before = files_state(original)
    elsewhere = tmp_path / "other_disk" / "run"
    (shutil.move if how == "move" else shutil.copytree)(original, elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Lightning's "The dirpath has changed ... won't be reloaded"
        assert main(["--resume", str(elsewhere), "max_steps=30"]) == 0
    # One last.ckpt (no last-v1.ckpt), and the step checkpoints from before the move pruned with the others.
    assert sorted(p.name for p in (elsewhere / "checkpoints").iterdir()) == ["epoch=0-step=24.ckpt", "epoch=0-step=28.ckpt", "last.ckpt"]
    assert checkpoint_step(elsewhere / "checkpoints" / "last.ckpt") == 30
    if how == "copy":  # the run it was copied from is left as it was
        assert files_state(original) == before


def test_a_relocated_checkpoint_state_forgets_the_files_the_new_directory_lacks(tmp_path):
    from forgather.lightning.model_checkpoint import relocated

    old, new = "/old/run/checkpoints", tmp_path
    for name in ("step=8.ckpt", "last.ckpt"):
        (tmp_path / name).touch()
    state = {"dirpath": old, "best_model_path": f"{old}/step=4.ckpt", "last_model_path": f"{old}/last.ckpt",
             "best_k_models": {f"{old}/step=4.ckpt": 4, f"{old}/step=8.ckpt": 8, "/elsewhere/a.ckpt": 6},
             "kth_best_model_path": f"{old}/step=4.ckpt", "kth_value": 4}
    moved = relocated(state, old, str(new), mode="max")
    assert moved["dirpath"] == str(new) and moved["last_model_path"] == f"{new}/last.ckpt"
    assert moved["best_k_models"] == {f"{new}/step=8.ckpt": 8, "/elsewhere/a.ckpt": 6}
    assert (moved["kth_best_model_path"], moved["kth_value"]) == ("/elsewhere/a.ckpt", 6)  # the worst left, mode max
    assert moved["best_model_path"] == f"{old}/step=4.ckpt"  # as Lightning keeps it: a path, never opened to delete


def test_resuming_with_other_data_or_batch_size_says_so_and_the_same_data_does_not(tmp_path, recwarn):
    from forgather.lightning.datamodule import DataChangedWarning

    assert run(tmp_path, *MICRO, "max_steps=8") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert main(["--resume", str(run_dir), "max_steps=10"]) == 0
    assert not [w for w in recwarn if w.category is DataChangedWarning]
    with pytest.warns(DataChangedWarning, match=r"resuming with batch_size=2 \(the checkpoint's: 4\): training goes on"):
        assert main(["--resume", str(run_dir), "max_steps=12", "batch_size=2"]) == 0
    with pytest.warns(DataChangedWarning, match=r"resuming with other training data \(its documents, tokenizer or packing"):
        assert main(["--resume", str(run_dir), "max_steps=14", "batch_size=2", "tokenizer.documents.max_documents=150"]) == 0


def test_a_resume_trains_with_the_optimizer_settings_its_overrides_give_and_says_so(tmp_path, caplog):
    assert run(tmp_path, *MICRO, "max_steps=8") == 0  # lr 0.003, weight_decay 0.01
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert main(["--resume", str(run_dir), "max_steps=10"]) == 0
    assert "the config's" not in caplog.text
    assert main(["--resume", str(run_dir), "max_steps=12", "lr=0.03", "weight_decay=0.1"]) == 0
    assert ("resuming with the config's lr=0.03 (the checkpoint's: 0.003), weight_decay=0.1 (the checkpoint's: 0.01): "
            "the optimizer goes on with it") in caplog.text
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rates = {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(file) if row["train/lr"]}
    assert rates[9] == pytest.approx(0.003) and rates[10] == rates[11] == pytest.approx(0.03)
    (group,) = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]["param_groups"]
    assert (group["initial_lr"], group["weight_decay"]) == (pytest.approx(0.03), 0.1)


def test_a_run_extended_twice_has_the_history_and_losses_of_an_uninterrupted_one(reference, tmp_path):
    # Neither 6 nor 11 is a checkpoint step (every 4): each resume starts where the previous fit ended.
    assert run(tmp_path, *MICRO, "max_steps=6") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--resume", str(run_dir), "max_steps=11"]) == 0
    # A resumed run's checkpoint directory holds its checkpoints: Lightning's "exists and is not empty" is noise.
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert main(["--resume", str(run_dir), "max_steps=16"]) == 0
    assert history(run_dir) == history(reference)
    assert yaml.safe_load((run_dir / "metrics.yaml").read_text())["step"] == 16


def test_the_csv_logger_keeps_the_rows_before_its_first_step_and_drops_a_row_cut_by_a_kill(tmp_path):
    (tmp_path / "csv").mkdir()
    cut = "0,1,"  # a validation row whose write a kill cut short
    (tmp_path / "csv" / "metrics.csv").write_text(f"epoch,step,train/loss,val/loss\n0,0,5.0,\n0,1,4.0,\n0,2,3.0,\n{cut}")
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"epoch": 0, "train/loss": 3.5, "train/lr": 0.1}, step=2)
    logger.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = [(r["step"], r["train/loss"], r["val/loss"], r["train/lr"]) for r in csv.DictReader(file)]
    assert rows == [("0", "5.0", "", ""), ("1", "4.0", "", ""), ("2", "3.5", "", "0.1")]


def csv_rows(path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as file:
        return [(r["step"], r["train/loss"], r.get("train/lr", "")) for r in csv.DictReader(file)]


def test_the_row_logged_after_a_checkpoint_replaces_the_provisional_one(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 5.0}, step=0)
    logger.save()
    logger.experiment.write_provisional({"train/loss": 4.0}, 1)  # before the step-1 checkpoint
    assert csv_rows(tmp_path / "csv" / "metrics.csv") == [("0", "5.0", ""), ("1", "4.0", "")]
    logger.log_metrics({"train/loss": 4.0, "train/lr": 0.1}, step=1)  # Lightning's row, with one more metric
    logger.log_metrics({"train/loss": 3.0, "train/lr": 0.1}, step=2)
    logger.save()
    assert csv_rows(tmp_path / "csv" / "metrics.csv") == [("0", "5.0", ""), ("1", "4.0", "0.1"), ("2", "3.0", "0.1")]


@pytest.mark.parametrize("new_column", [False, True])
def test_a_kill_while_the_provisional_row_is_replaced_keeps_it(tmp_path, monkeypatch, new_column):
    """The provisional row stands for the checkpoint's step until its replacement is whole on disk: a process
    killed between dropping it and writing Lightning's row (once lost the row for good) leaves the file as it
    was, with no temporary file beside it."""
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 5.0, "train/lr": 0.1}, step=0)
    logger.save()
    logger.experiment.write_provisional({"train/loss": 4.0, "train/lr": 0.1}, 1)
    before = (tmp_path / "csv" / "metrics.csv").read_bytes()

    def killed(self, rows):
        raise KeyboardInterrupt  # what SIGINT raises; SIGKILL stops the process where this raises

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    logger.log_metrics({"train/loss": 4.0, "train/lr": 0.1, **({"train/grad_norm": 2.0} if new_column else {})},
                       step=1)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_bytes() == before
    assert csv_rows(tmp_path / "csv" / "metrics.csv") == [("0", "5.0", "0.1"), ("1", "4.0", "0.1")]
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["metrics.csv"]


def test_checkpoint_step_reads_files_and_sharded_directories(tmp_path):
    torch.save({"global_step": 7, "state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    (tmp_path / "b.ckpt").mkdir()
    torch.save({"global_step": 9}, tmp_path / "b.ckpt" / "meta.pt")
    assert (checkpoint_step(tmp_path / "a.ckpt"), checkpoint_step(tmp_path / "b.ckpt")) == (7, 9)


def test_resuming_from_a_truncated_checkpoint_names_it_and_the_newest_one_that_reads(tmp_path, capsys):
    """A checkpoint cut short (a copy that stopped, a file written over) was torch's traceback about zip archives."""
    assert run(tmp_path, *MICRO, "max_steps=2") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    last = run_dir / "checkpoints" / "last.ckpt"
    whole = last.read_bytes()
    last.write_bytes(whole[:1000])
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "max_steps=4"]) == 2
    assert capsys.readouterr().err == (f"error: {last}: not a readable checkpoint (1000 bytes, truncated or corrupt); "
                                       f"no other checkpoint of this run reads: start over with --from-snapshot {run_dir}\n")
    earlier = last.with_name("step=1.ckpt")
    earlier.write_bytes(whole)
    os.utime(earlier, ns=(last.stat().st_mtime_ns - 10**9,) * 2)
    assert main(["--resume", str(run_dir), "max_steps=4"]) == 2
    assert capsys.readouterr().err.endswith(f"; move it out of {last.parent} to resume from step=1.ckpt (step 2), "
                                            "the newest one that reads\n")
    from forgather.cli.main import main as forgather_main

    assert forgather_main(["export", str(run_dir), "--checkpoint", str(last), "--out", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err == (f"error: {last}: not a readable checkpoint (1000 bytes, truncated or corrupt); "
                                       f"export step=1.ckpt (step 2), the newest one that reads: --checkpoint {earlier}\n")


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=4") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    before = files_state(run_dir, tmp_path / "output_models")
    capsys.readouterr()
    assert main(["--resume", str(run_dir)]) == 0
    assert f"{run_dir} already finished at step 4 (max_steps=4): nothing to do" in capsys.readouterr().out
    assert files_state(run_dir, tmp_path / "output_models") == before


def test_a_failed_export_is_not_taken_for_the_run_and_resume_redoes_it(tmp_path, monkeypatch, capsys):
    import forgather.models.export as export

    exported = tmp_path / "output_models" / "micro"
    assert run(tmp_path, *MICRO, "max_steps=2") == 0
    (first,) = run_dirs(tmp_path / "outputs")

    monkeypatch.setattr(export, "_save_weights", disk_full)
    with contextlib.suppress(ExportFailed):
        assert run(tmp_path, *MICRO, "max_steps=4") != 0
    monkeypatch.undo()
    (second,) = set(run_dirs(tmp_path / "outputs")) - {first}
    assert read_record(exported)["run_dir"] == str(first), "the model left there is recorded as the first run's"
    assert not list(tmp_path.glob("output_models/.*")), "no staging left behind"

    previous = os.umask(0o002)
    try:
        capsys.readouterr()
        assert main(["--resume", str(second)]) == 0
    finally:
        os.umask(previous)
    assert f"its model export did not complete: exporting it to {exported}" in capsys.readouterr().out
    assert read_record(exported) | {"exported": None} == {"run_dir": str(second), "step": 4, "name": "micro", "exported": None}
    state = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    weights = load_file(exported / "model.safetensors")
    assert all(torch.equal(weights[key], value) for key, value in state.items() if key in weights)
    assert {oct(p.stat().st_mode & 0o777) for p in exported.iterdir()} == {oct(0o664)}, "files follow the umask"
    assert main(["--resume", str(second)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["--resume", str(first)]) == 0, "a finished run whose export completed is not exported again"
    assert "nothing to do" in capsys.readouterr().out and read_record(exported)["run_dir"] == str(second)


def test_a_failed_export_says_what_the_directory_still_holds(tmp_path, monkeypatch):
    import forgather.models.export as export

    monkeypatch.setattr(export, "_save_weights", disk_full)
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "export.yaml").write_text(yaml.safe_dump({"run_dir": "/runs/a", "step": 7}))
    exporter = ExportModel(out_dir, "micro", model_config={}, run_dir=tmp_path / "b")
    with pytest.raises(ExportFailed, match=r"No space left .* still holds the model of /runs/a at step 7, not this run's; .*--resume"):
        exporter.export(torch.nn.Linear(2, 2), step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staging_of_killed_writers_is_removed_at_the_next_start(tmp_path):
    assert run(tmp_path, *MICRO, "max_steps=2") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    dead, live = dead_pid(), os.getppid()
    killed = [
        run_dir / "checkpoints" / f".epoch=0-step=8.ckpt.tmp-{dead}",  # AtomicCheckpointIO
        run_dir / "checkpoints" / ".control-step6.ckpt.partial",  # JobControl
        run_dir / f".snapshot.tmp-{dead}",
        tmp_path / "output_models" / f".micro.tmp-{dead}",
        tmp_path / "output_models" / f".micro.old-{dead}",
    ]
    in_progress = tmp_path / "output_models" / f".micro.tmp-{live}"  # another live run exporting the same model
    for path in [*killed, in_progress]:
        path.mkdir() if "micro" in path.name or "snapshot" in path.name else path.write_bytes(b"partial")
    assert main(["--resume", str(run_dir), "max_steps=3"]) == 0
    assert [p for p in killed if p.exists()] == []
    assert in_progress.is_dir()


def test_the_aside_of_an_export_killed_between_its_renames_is_put_back_not_deleted(tmp_path):
    """`forgather export` into RUN/exports/step-5, killed after moving the old step-5 aside: the run's next
    start deleted that aside, the only copy of the package."""
    from forgather.lightning.checkpoint_io import remove_staging

    dead = dead_pid()
    aside, replaced = tmp_path / f".step-5.old-{dead}", tmp_path / f".step-6.old-{dead}"
    for path in (aside, replaced, tmp_path / "step-6"):
        path.mkdir()
        (path / "model.safetensors").write_text(path.name)
    with pytest.warns(UserWarning, match=r"step-5: restored the model that an interrupted conversion or export"):
        assert remove_staging(tmp_path) == [replaced]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5", "step-6"]
    assert (tmp_path / "step-5" / "model.safetensors").read_text() == aside.name


def test_of_two_asides_of_one_export_the_newer_is_put_back_and_the_older_deleted(tmp_path):
    from forgather.lightning.checkpoint_io import remove_staging

    older, newer = tmp_path / f".step-5.old-{dead_pid()}", tmp_path / f".step-5.old-{dead_pid()}"
    assert older != newer
    for path, mtime in ((older, 1_000), (newer, 2_000)):
        path.mkdir()
        (path / "model.safetensors").write_text(path.name)
        os.utime(path, (mtime, mtime))
    with pytest.warns(UserWarning, match=r"step-5: restored the model"):
        assert remove_staging(tmp_path) == [older]
    assert [p.name for p in tmp_path.iterdir()] == ["step-5"]
    assert (tmp_path / "step-5" / "model.safetensors").read_text() == newer.name


def test_output_dir_is_where_the_run_goes_and_every_run_says_where_it_is(tmp_path, capsys):
    wanted = tmp_path / "my_run"
    assert run(tmp_path, *MICRO, "max_steps=2", f"output_dir={wanted}") == 0
    out = capsys.readouterr().out
    assert (wanted / "snapshot").is_dir() and (wanted / "metrics.yaml").is_file()
    assert not (tmp_path / "outputs").exists()
    assert yaml.safe_load((wanted / "snapshot" / "config.yaml").read_text())["output_dir"] == str(wanted)
    assert out.count(f"run directory: {wanted}\n") == 2
    assert f"exported model: {tmp_path / 'output_models' / 'micro'} (written when training ends)\n" in out
    assert out.rstrip().endswith(f"exported model: {tmp_path / 'output_models' / 'micro'}")


def test_a_requeued_slurm_job_that_starts_a_new_run_says_how_to_continue_the_old_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the job's first run
    assert run(tmp_path, *MICRO, "max_steps=1") == 0
    assert "SLURM" not in capsys.readouterr().out
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run(tmp_path, *MICRO, "max_steps=1") == 0
    assert ("warning: this SLURM job runs again (SLURM_RESTART_COUNT=1) and starts a new run from step 0; to continue "
            "the run it started instead, give its command --auto-resume and output_dir=runs/$SLURM_JOB_ID") in capsys.readouterr().out
    assert run(tmp_path, *MICRO, "max_steps=1", f"output_dir={tmp_path / 'job'}") == 0
    assert run(tmp_path, *MICRO, "max_steps=1", f"output_dir={tmp_path / 'job'}") == 2
    assert "--auto-resume does it every time" in capsys.readouterr().err
    assert run(tmp_path, "-m", *MICRO, "max_steps=1") == 0
    assert ("starts a new sweep; to continue the sweep it started instead, resume it with --resume "
            "multirun/<time>") in capsys.readouterr().out


def test_a_run_says_whose_exported_model_it_will_replace(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=1", f"output_dir={tmp_path / 'first'}") == 0
    assert "replacing" not in capsys.readouterr().out
    assert run(tmp_path, *MICRO, "max_steps=1", f"output_dir={tmp_path / 'second'}") == 0
    assert (f"exported model: {tmp_path / 'output_models' / 'micro'} (written when training ends, replacing the model "
            f"of {tmp_path / 'first'} at step 1)") in capsys.readouterr().out


def test_output_dir_refuses_a_directory_that_holds_a_run(tmp_path, capsys):
    wanted = tmp_path / "taken"
    (wanted / "snapshot").mkdir(parents=True)
    (wanted / "snapshot" / "config.yaml").write_text("output_dir: x\n")
    (wanted / "snapshot" / "meta.yaml").write_text("experiment: micro\n")
    assert run(tmp_path, *MICRO, f"output_dir={wanted}") == 2
    err = capsys.readouterr().err
    assert err == f"error: output_dir={wanted}: {wanted} is not empty (`--resume {wanted}` continues that run)\n"
    assert main(["--resume", str(wanted), "output_dir=/elsewhere"]) == 2
    assert "a resumed run stays in" in capsys.readouterr().err
    assert run(tmp_path, "-m", *MICRO, "lr=1e-3,3e-3", f"output_dir={wanted}") == 2
    assert "choose where multirun/ goes with --outputs DIR" in capsys.readouterr().err


def test_multirun_with_a_run_directory_reruns_one_point_or_says_what_to_do(tmp_path, capsys):
    assert run(tmp_path, "-m", *MICRO, "max_steps=1") == 0
    (point,) = run_dirs(tmp_path / "multirun")
    assert main(["--outputs", str(tmp_path / "again"), "-m", "--from-snapshot", str(point)]) == 0
    (again,) = run_dirs(tmp_path / "again")
    assert train_losses(again) == train_losses(point)
    capsys.readouterr()
    assert main(["-m", "--resume", str(point), "max_steps=2,3"]) == 2
    assert "a sweep with --resume" in capsys.readouterr().err
    assert main(["-m", "--from-snapshot", str(point), "lr=1e-3,3e-3"]) == 2
    assert "to sweep, run the experiment: -m +experiment=micro" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [("optimizer=adamw_in_backward", "gradient_clip_val=null"),
                                       ("optimizer=adamw_in_backward", "gradient_clip_val=null", "bucket_size=4096"),
                                       ("optimizer=adamw_compiled",), ("optimizer=adamw_triton",)],
                         ids=["in_backward", "buckets", "compiled", "triton"])
def test_a_run_with_another_adamw_resumes_exactly(tmp_path, overrides):
    """The per-parameter (or per-bucket) AdamW states of an optimizer stepping inside backward, and
    CompiledAdamW's (on a CPU its eager foreach step), travel through the checkpoint: stopped at 6 and resumed to
    10, the losses are those of a run of 10."""
    common = (*MICRO, *overrides)
    assert run(tmp_path / "whole", *common, "max_steps=10") == 0
    assert run(tmp_path / "cut", *common, "max_steps=6") == 0
    (whole,) = run_dirs(tmp_path / "whole" / "outputs")
    (cut,) = run_dirs(tmp_path / "cut" / "outputs")
    assert main(["--resume", str(cut), "max_steps=10"]) == 0
    assert train_steps(cut) == list(range(10))
    assert train_losses(cut) == train_losses(whole)


def test_resuming_with_another_model_shape_is_one_line_naming_the_first_difference(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=2") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "hidden_size=64", "max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "the checkpoint does not fit this config's model: model.embed.weight is [" in line
    assert "32] in the checkpoint and [" in line and "64] here (and " in line
    assert "; since the run started, model.hidden_size was 32, is 64, " in line  # what changed it
    assert line.endswith(f"--from-snapshot {run_dir} OVERRIDES")
    assert main(["--resume", str(run_dir), "num_layers=3", "max_steps=4"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "this model has parameters the checkpoint lacks: model.layers.2." in line
    assert "; since the run started, model.num_layers was 2, is 3 ; to go on" in line


def test_a_group_choice_on_a_recorded_run_says_to_start_a_new_run(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=2") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    capsys.readouterr()
    for flag in ("--resume", "--from-snapshot"):
        assert main([flag, str(run_dir), "optimizer=adafactor"]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: optimizer=adafactor: {flag} runs the config as it was recorded, where "
                               "optimizer is forgather.optim.triton_adamw:TritonAdamW")
        assert "python -m forgather.run +experiment=micro optimizer=adafactor ..." in line


def test_export_writes_a_checkpoint_as_a_model_directory_and_only_reads_the_run(tmp_path, capsys):
    from forgather.cli.main import main as forgather_main
    from forgather.models.export import load_model

    assert run(tmp_path, *MICRO, "max_steps=8") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    before = files_state(run_dir, tmp_path / "output_models")
    early = next(p for p in (run_dir / "checkpoints").glob("*.ckpt") if checkpoint_step(p) == 4)
    capsys.readouterr()
    assert forgather_main(["export", str(run_dir), "--checkpoint", str(early)]) == 0
    assert capsys.readouterr().out == f"exported model: {run_dir / 'exports' / 'step-4'}\n"
    state = torch.load(early, map_location="cpu", weights_only=False)["state_dict"]
    weights = load_file(run_dir / "exports" / "step-4" / "model.safetensors")
    assert weights and all(torch.equal(weights[key], state[key]) for key in weights)
    assert read_record(run_dir / "exports" / "step-4") | {"exported": None} == {
        "run_dir": str(run_dir), "step": 4, "name": "micro", "exported": None}
    # the newest checkpoint by default: the model the run exported when it ended; it loads and runs
    out = tmp_path / "served"
    assert forgather_main(["export", str(run_dir), "--out", str(out)]) == 0
    final = load_file(tmp_path / "output_models" / "micro" / "model.safetensors")
    assert load_file(out / "model.safetensors").keys() == final.keys()
    assert all(torch.equal(load_file(out / "model.safetensors")[k], v) for k, v in final.items())
    model = load_model(out)
    assert model(torch.tensor([[1, 2, 3]])).shape[:2] == (1, 3)
    # the run and its own export are as they were, but for the new exports/ directory
    after = files_state(run_dir, tmp_path / "output_models")
    assert {k: v for k, v in after.items() if "/exports/" not in k} == before
    assert forgather_main(["export", str(run_dir), "--checkpoint", str(run_dir / "nope.ckpt")]) == 2
    assert "nope.ckpt: no such checkpoint" in capsys.readouterr().err
    # a run in pure bf16 is exported in bf16
    halved = tmp_path / "bf16.ckpt"
    saved = torch.load(early, map_location="cpu", weights_only=False)
    saved["state_dict"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
    torch.save(saved, halved)
    assert forgather_main(["export", str(run_dir), "--checkpoint", str(halved), "--out", str(tmp_path / "bf16")]) == 0
    assert {v.dtype for v in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_inf_server_serves_a_run_directory_through_its_newest_checkpoint_exported_once(tmp_path, monkeypatch, capsys):
    from forgather.cli import inf
    from forgather.serve.backend import Backend

    assert run(tmp_path, *MICRO, "max_steps=4") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    loaded = []

    def load(directory, *args, **kwargs):
        loaded.append(Path(directory))
        raise FileNotFoundError("Backend.load was reached")

    monkeypatch.setattr(Backend, "load", load)
    assert inf.main(["server", "-m", str(run_dir), "--port", "0"]) == 2
    assert loaded == [run_dir / "exports" / "step-4"] and (loaded[0] / "model.safetensors").is_file()
    written = (loaded[0] / "model.safetensors").stat().st_mtime_ns
    assert inf.main(["server", "-m", str(run_dir), "--port", "0"]) == 2  # the export is taken again, not redone
    assert loaded[1] == loaded[0] and (loaded[0] / "model.safetensors").stat().st_mtime_ns == written
    assert f"serving {run_dir}'s newest checkpoint, exported to {loaded[0]}" in capsys.readouterr().err
