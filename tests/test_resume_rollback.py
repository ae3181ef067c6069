"""Going back: `--resume RUN_DIR --checkpoint NAME_OR_STEP` continues from an earlier checkpoint and keeps the
newer ones aside, never deleted; `keep_checkpoints` lowered on a resume brings the step checkpoints down at once."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forgather.callbacks.divergence import StopOnDivergence, TrainingDiverged
from forgather.errors import UserError
from forgather.lightning.model_checkpoint import ModelCheckpoint
from forgather.run import (checkpoint_step, checkpoints_newest_first, chosen_checkpoint, latest_checkpoint, main,
                           newer_than, resume_arguments, set_aside)
from test_resume import history, train_losses
from test_run import run, run_dirs

MICRO = ("+experiment=micro", "scheduler=constant")  # a checkpoint every 4 steps


def files_state(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def fake_run(tmp_path: Path, steps: dict[str, int | None]) -> Path:
    """A run directory whose checkpoints/ holds `steps` (name: step; None: a file that does not read), written in
    that order, one second apart."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for order, (name, step) in enumerate(steps.items()):
        path = checkpoints / name
        torch.save({"global_step": step}, path) if step is not None else path.write_bytes(b"cut short")
        os.utime(path, ns=((10**9 + order) * 10**9,) * 2)
    return tmp_path / "run"


STEPS = {"epoch=0-step=4.ckpt": 4, "epoch=0-step=8.ckpt": 8, "epoch=0-step=12.ckpt": 12, "last.ckpt": 14}


@pytest.mark.parametrize("wanted", ["8", "epoch=0-step=8.ckpt", "epoch=0-step=8", "run/checkpoints/epoch=0-step=8.ckpt"])
def test_a_checkpoint_is_named_by_its_file_or_its_step(tmp_path, monkeypatch, wanted):
    run_dir = fake_run(tmp_path, STEPS)
    monkeypatch.chdir(tmp_path)
    assert chosen_checkpoint(run_dir, wanted) == run_dir / "checkpoints" / "epoch=0-step=8.ckpt"


def test_a_step_without_a_checkpoint_or_an_unknown_name_is_one_line_listing_the_steps(tmp_path):
    run_dir = fake_run(tmp_path, STEPS)
    with pytest.raises(UserError) as error:
        chosen_checkpoint(run_dir, "10")
    assert str(error.value) == f"--checkpoint 10: {run_dir} has no checkpoint at step 10; its checkpoints are at steps 4, 8, 12, 14"
    with pytest.raises(UserError) as error:
        chosen_checkpoint(run_dir, "epoch=0-step=9.ckpt")
    message = str(error.value)
    assert "\n" not in message and "no such checkpoint" in message and "did you mean 'epoch=0-step=8.ckpt'" in message
    assert message.endswith("give a file name there or a step: 4, 8, 12, 14")


def test_a_checkpoint_given_to_resume_names_its_run_and_checkpoint_and_not_both_ways(tmp_path):
    ckpt = str(tmp_path / "run" / "checkpoints" / "epoch=0-step=8.ckpt")
    assert resume_arguments(ckpt, None) == (str(tmp_path / "run"), "epoch=0-step=8.ckpt")
    assert resume_arguments(str(tmp_path / "run"), "8") == (str(tmp_path / "run"), "8")
    with pytest.raises(UserError, match="names a checkpoint and --checkpoint 8 another: give one"):
        resume_arguments(ckpt, "8")
    with pytest.raises(UserError, match="not a checkpoint in a run's checkpoints/"):
        resume_arguments(str(tmp_path / "model.ckpt"), None)


def test_checkpoint_without_resume_is_refused_in_one_line(capsys):
    assert main(["--checkpoint", "8", "+experiment=micro"]) == 2
    assert capsys.readouterr().err == ("error: --checkpoint NAME_OR_STEP goes with --resume RUN_DIR: it names the "
                                       "checkpoint of that run to continue from\n")


def test_the_newer_checkpoints_are_moved_aside_with_the_history_and_never_taken_again(tmp_path, capsys):
    run_dir = fake_run(tmp_path, {**STEPS, "control.ckpt": None})  # one that does not read, written last
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text("step,train/loss\n0,5.0\n")
    before = files_state(run_dir / "checkpoints")
    chosen = run_dir / "checkpoints" / "epoch=0-step=8.ckpt"
    later = newer_than(run_dir, chosen)
    assert [p.name for p in later] == ["control.ckpt", "last.ckpt", "epoch=0-step=12.ckpt"]
    aside = set_aside(run_dir, later)
    assert aside.parent == run_dir / "checkpoints" and aside.name.startswith("abandoned-")
    assert checkpoints_newest_first(run_dir / "checkpoints") == [chosen, run_dir / "checkpoints" / "epoch=0-step=4.ckpt"]
    assert files_state(aside) == {**{name: before[name] for name in ("control.ckpt", "last.ckpt", "epoch=0-step=12.ckpt")},
                                  "metrics.csv": b"step,train/loss\n0,5.0\n"}
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (f"rolling back: moved 3 newer checkpoints (control.ckpt, last.ckpt, epoch=0-step=12.ckpt, steps "
                    f"12-14) and a copy of csv/metrics.csv to {aside}; a later --resume does not take them, move them "
                    f"back to return to them")
    assert set_aside(run_dir, newer_than(run_dir, chosen)) is None, "nothing newer left: nothing moved"


def test_a_last_ckpt_of_the_chosen_step_stays(tmp_path):
    run_dir = fake_run(tmp_path, {"epoch=0-step=4.ckpt": 4, "epoch=0-step=8.ckpt": 8, "last.ckpt": 8})
    assert newer_than(run_dir, run_dir / "checkpoints" / "epoch=0-step=8.ckpt") == []


def checkpoint_callback(tmp_path: Path, keep: int, steps: list[int], resumed: int | None):
    """A ModelCheckpoint as a resume restores it (step checkpoints `steps` recorded), its trainer resuming from
    the checkpoint of step `resumed` (None: from last.ckpt)."""
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=keep, monitor="step", mode="max", save_last=True)
    paths = {step: str(tmp_path / f"epoch=0-step={step}.ckpt") for step in steps}
    for path in [*paths.values(), str(tmp_path / "last.ckpt")]:
        Path(path).write_bytes(b"weights")
    callback.best_k_models = {path: torch.tensor(float(step)) for step, path in paths.items()}
    callback.last_model_path = str(tmp_path / "last.ckpt")
    trainer = SimpleNamespace(ckpt_path=paths[resumed] if resumed is not None else callback.last_model_path,
                              is_global_zero=True, strategy=SimpleNamespace(remove_checkpoint=os.remove))
    return callback, trainer


def test_keep_checkpoints_lowered_on_a_resume_removes_the_oldest_at_once_and_says_which(tmp_path, capsys):
    callback, trainer = checkpoint_callback(tmp_path, keep=2, steps=[4, 8, 12, 16], resumed=None)
    callback._keep_only_top_k(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=12.ckpt", "epoch=0-step=16.ckpt", "last.ckpt"]
    assert sorted(Path(p).name for p in callback.best_k_models) == ["epoch=0-step=12.ckpt", "epoch=0-step=16.ckpt"]
    assert (Path(callback.kth_best_model_path).name, float(callback.kth_value)) == ("epoch=0-step=12.ckpt", 12.0)
    assert Path(callback.best_model_path).name == "epoch=0-step=16.ckpt"
    assert capsys.readouterr().out == (f"keep_checkpoints=2 (save_top_k): removed 2 step checkpoints beyond the 2 kept "
                                       f"(epoch=0-step=4.ckpt, epoch=0-step=8.ckpt) from {tmp_path}\n")
    callback._keep_only_top_k(trainer)
    assert capsys.readouterr().out == "", "already at keep_checkpoints: nothing to do"


def test_keep_checkpoints_never_removes_the_checkpoint_resumed_from(tmp_path, capsys):
    callback, trainer = checkpoint_callback(tmp_path, keep=0, steps=[4, 8], resumed=8)
    callback._keep_only_top_k(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=8.ckpt", "last.ckpt"]
    assert callback.best_k_models == {}
    assert capsys.readouterr().out.endswith("(epoch=0-step=4.ckpt) from "
                                            f"{tmp_path}; epoch=0-step=8.ckpt kept on disk, no longer counted\n")


def test_the_divergence_error_names_the_rollback_with_the_steps_kept(tmp_path):
    run_dir = fake_run(tmp_path, {"epoch=0-step=4.ckpt": 4, "epoch=0-step=8.ckpt": 8, "last.ckpt": 8})
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.bias[0] = float("nan")
    trainer = SimpleNamespace(world_size=1, global_step=9, global_rank=0,
                              checkpoint_callbacks=[SimpleNamespace(dirpath=str(run_dir / "checkpoints"))],
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    with pytest.raises(TrainingDiverged) as error:
        StopOnDivergence().on_train_end(trainer, module)
    assert str(error.value).endswith(f"(python -m forgather.run --resume {run_dir} lr=...); to go back further (its "
                                     f"optimizer state may already be harmed), roll back to an earlier one: --resume "
                                     f"{run_dir} --checkpoint STEP lr=... (steps kept: 4)")


def test_rolling_back_continues_from_the_chosen_checkpoint_and_keeps_the_newer_ones_aside(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=14") == 0  # step checkpoints at 4, 8, 12; last.ckpt at 14
    (run_dir,) = run_dirs(tmp_path / "outputs")
    checkpoints = run_dir / "checkpoints"
    before, losses, rows = files_state(checkpoints), train_losses(run_dir), history(run_dir)
    original_csv = (run_dir / "csv" / "metrics.csv").read_bytes()
    assert main(["--resume", str(run_dir), "--checkpoint", "10"]) == 2
    assert "has no checkpoint at step 10; its checkpoints are at steps 4, 8, 12, 14" in capsys.readouterr().err
    assert files_state(checkpoints) == before, "a refused rollback moves nothing"

    assert main(["--resume", str(run_dir), "--checkpoint", "8", "lr=1e-4"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from epoch=0-step=8.ckpt (step 8)" in out
    (aside,) = checkpoints.glob("abandoned-*")
    assert f"rolling back: moved 2 newer checkpoints (last.ckpt, epoch=0-step=12.ckpt, steps 12-14) and a copy of " \
           f"csv/metrics.csv to {aside}" in out
    assert files_state(aside) == {"epoch=0-step=12.ckpt": before["epoch=0-step=12.ckpt"], "last.ckpt": before["last.ckpt"],
                                  "metrics.csv": original_csv}, "the abandoned branch, whole"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=12.ckpt", "epoch=0-step=4.ckpt",
                                                                 "epoch=0-step=8.ckpt", "last.ckpt"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 14 and latest_checkpoint(run_dir) == checkpoints / "last.ckpt"
    assert files_state(checkpoints)["epoch=0-step=12.ckpt"] != before["epoch=0-step=12.ckpt"], "trained again, at lr=1e-4"
    # The history holds each step once: the steps before 8 as they were, from 8 on the new branch's.
    new_rows, new_losses = history(run_dir), train_losses(run_dir)
    assert sorted(new_losses) == list(range(14))
    assert [r for r in new_rows if int(r["step"]) < 8] == [r for r in rows if int(r["step"]) < 8]
    assert all(new_losses[step] != losses[step] for step in range(9, 14))


def test_keep_checkpoints_lowered_on_a_resume_leaves_that_many(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=14") == 0  # every step checkpoint kept: 4, 8, 12
    (run_dir,) = run_dirs(tmp_path / "outputs")
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "max_steps=18", "keep_checkpoints=1"]) == 0
    assert ("keep_checkpoints=1 (save_top_k): removed 2 step checkpoints beyond the 1 kept (epoch=0-step=4.ckpt, "
            "epoch=0-step=8.ckpt)") in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch=0-step=16.ckpt", "last.ckpt"]


def test_a_checkpoint_given_to_resume_rolls_back_and_a_later_resume_continues_the_new_branch(tmp_path, capsys):
    assert run(tmp_path, *MICRO, "max_steps=10", "keep_checkpoints=3") == 0  # 4, 8; last.ckpt at 10
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert main(["--resume", str(run_dir / "checkpoints" / "epoch=0-step=4.ckpt"), "max_steps=6"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 6
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from last.ckpt (step 6)" in out and "rolling back" not in out
    assert sorted(train_losses(run_dir)) == list(range(10))
    (aside,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["epoch=0-step=8.ckpt", "last.ckpt", "metrics.csv"]
