"""What --resume must never do: go back to an older checkpoint than the newest, hide a model a killed writer set
aside, load one optimizer's state into another, or send a moved run's model back to where the run was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from forgather.run import checkpoint_step, checkpoints_newest_first, latest_checkpoint, main
from test_run import run, run_dirs

MICRO = ("+experiment=micro", "scheduler=constant")


def files_state(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_copy_that_did_not_keep_modification_times_resumes_from_its_highest_step(tmp_path, capsys):
    """`cp -r` (or rsync -r, a restore from a backup) dates the files in copy order: the newest by modification
    time was the one copied last, and a resume went back to it, training its steps again."""
    assert run(tmp_path, *MICRO, "max_steps=10") == 0  # step checkpoints at 4 and 8, last.ckpt at 10
    (run_dir,) = run_dirs(tmp_path / "outputs")
    checkpoints = run_dir / "checkpoints"
    for order, name in enumerate(["last.ckpt", "epoch=0-step=8.ckpt", "epoch=0-step=4.ckpt"]):  # copied in this order
        os.utime(checkpoints / name, ns=(10**18 + order * 10**9,) * 2)
    assert latest_checkpoint(run_dir) == checkpoints / "last.ckpt"
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "max_steps=12"]) == 0
    assert f"resuming {run_dir} from last.ckpt (step 10)" in capsys.readouterr().out
    assert checkpoint_step(checkpoints / "last.ckpt") == 12
    assert not list(checkpoints.glob("*-v1.ckpt")), "no step checkpoint was written again beside the one it had"


def test_of_checkpoints_at_one_step_the_latest_modified_is_newest_and_one_that_does_not_read_keeps_its_place(tmp_path):
    def save(name: str, step: int | None, mtime: int) -> Path:
        path = tmp_path / name
        torch.save({"global_step": step}, path) if step is not None else path.write_bytes(b"cut short")
        os.utime(path, ns=(mtime * 10**9,) * 2)
        return path

    step_8 = save("epoch=0-step=8.ckpt", 8, 100)
    last = save("last.ckpt", 8, 101)  # written just after the step checkpoint of its step
    older = save("epoch=0-step=4.ckpt", 4, 200)  # copied last
    broken = save("control-step9.ckpt", None, 102)  # a copy cut short, after last.ckpt: a resume names it
    assert checkpoints_newest_first(tmp_path) == [broken, last, step_8, older]


def test_an_export_aside_named_with_this_process_pid_is_put_back(tmp_path, recwarn):
    """A restarted container gives its process the pid of the one killed (PID 1, or the same small number): the
    aside of an export killed between its renames looked like a live write of this process, and stayed hidden."""
    from forgather.lightning.checkpoint_io import remove_staging

    aside = tmp_path / f".micro.old-{os.getpid()}"
    aside.mkdir()
    (aside / "model.safetensors").write_text("the only copy")
    remove_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro"]
    assert (tmp_path / "micro" / "model.safetensors").read_text() == "the only copy"


def test_resuming_with_another_optimizer_class_is_one_line_naming_both(tmp_path, capsys):
    """Lightning loaded the checkpoint's AdamW state into SGD, which failed at its first step: `error: momentum`."""
    assert run(tmp_path, *MICRO, "max_steps=2") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    before = files_state(run_dir / "checkpoints")
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "max_steps=4", "optimizer._target_=torch.optim.SGD", "~optimizer.betas"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {run_dir / 'checkpoints' / 'last.ckpt'}: its optimizer is "
                           "forgather.optim.triton_adamw.TritonAdamW, this config's torch.optim.sgd.SGD;")
    assert line.endswith("resume with the run's optimizer, or train this one in a new run (python -m forgather.run "
                         "--from-snapshot RUN_DIR OVERRIDES)")
    assert files_state(run_dir / "checkpoints") == before
    assert main(["--resume", str(run_dir), "max_steps=4"]) == 0, "the run's own optimizer resumes"


def test_a_run_whose_outputs_tree_moved_exports_into_the_moved_tree(tmp_path, capsys):
    """The snapshot records the export directory as an absolute path: a resume of the moved tree made the old
    tree again, to write its model there."""
    assert run(tmp_path / "old", *MICRO, "max_steps=4") == 0
    shutil.move(tmp_path / "old", tmp_path / "new")
    (run_dir,) = run_dirs(tmp_path / "new" / "outputs")
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "max_steps=6"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"exported model: {tmp_path / 'new' / 'output_models' / 'micro'}")
    assert not (tmp_path / "old").exists()
    assert "step: 6" in (tmp_path / "new" / "output_models" / "micro" / "export.yaml").read_text()


def test_a_checkpoint_the_user_moved_aside_as_old_is_kept_at_the_next_start(tmp_path):
    """`.<name>.old` without a pid is no writer's staging (theirs end in `-<pid>`): it was deleted with them."""
    from forgather.lightning.checkpoint_io import remove_staging

    (tmp_path / ".last.ckpt.old").write_bytes(b"the user's checkpoint")
    (tmp_path / ".last.ckpt.tmp").write_bytes(b"a sharded save cut short")
    assert remove_staging(tmp_path) == [tmp_path / ".last.ckpt.tmp"]
    assert (tmp_path / ".last.ckpt.old").read_bytes() == b"the user's checkpoint"


def test_resuming_a_stopped_extension_without_its_max_steps_is_one_line_and_keeps_the_export(tmp_path, capsys, monkeypatch):
    """A resume that raised max_steps, stopped by SIGTERM, says `continue with: python -m forgather.run --resume
    RUN_DIR`: that command, with the recorded max_steps below the checkpoint's step, took the run for finished and
    replaced the model it exported at its end with the stopped resume's mid-training weights."""
    import signal

    from forgather.callbacks.model_export import read_record
    from test_resume import signal_at

    assert run(tmp_path, *MICRO, "max_steps=8") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    exported = tmp_path / "output_models" / "micro"
    before = files_state(exported)
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert main(["--resume", str(run_dir), "max_steps=16"]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    # The stopped resume's own line gives its overrides again.
    assert f"continue with: python -m forgather.run --resume {run_dir} max_steps=16\n" in capsys.readouterr().err
    assert main(["--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err == (f"error: {run_dir}: last.ckpt is at step 11, past max_steps=8: a resume raised "
                                       f"max_steps and stopped before it finished ; give its overrides again to go on: "
                                       f"python -m forgather.run --resume {run_dir} max_steps=16 (max_steps=11 ends it "
                                       f"there and exports it)\n")
    assert files_state(exported) == before and read_record(exported)["step"] == 8
    assert main(["--resume", str(run_dir), "max_steps=16"]) == 0
    assert read_record(exported)["step"] == 16


def test_every_resume_is_recorded_in_the_snapshot_with_its_overrides(tmp_path):
    """The snapshot is written once, by the run's first start: the overrides a resume gave were recorded nowhere."""
    import yaml

    assert run(tmp_path, *MICRO, "max_steps=6") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    snapshot = files_state(run_dir / "snapshot")
    assert main(["--resume", str(run_dir), "max_steps=8", "lr=0.01"]) == 0
    assert main(["--resume", str(run_dir), "max_steps=10"]) == 0
    resumes = yaml.safe_load((run_dir / "snapshot" / "resumes.yaml").read_text())
    assert [(r["checkpoint"], r["step"], r["overrides"]) for r in resumes] == [
        ("last.ckpt", 6, ["max_steps=8", "lr=0.01"]), ("last.ckpt", 8, ["max_steps=10"])]
    assert "--resume" in resumes[0]["command"]
    assert {k: v for k, v in files_state(run_dir / "snapshot").items() if not k.endswith("resumes.yaml")} == snapshot
