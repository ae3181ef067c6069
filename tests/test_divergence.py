"""StopOnDivergence: a run whose weights stop being finite ends with one line naming the last good checkpoint,
and writes no checkpoint (nor model) of the diverged weights: alone, under the runner, and on DDP ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forgather.callbacks.divergence import StopOnDivergence, TrainingDiverged, first_nonfinite
from forgather.lightning.module import CausalLMModule
from forgather.run import checkpoint_step
from test_run import run, run_dirs

MICRO = ("+experiment=micro", "scheduler=constant", "max_steps=20")  # a checkpoint every 4 steps, logs every step


def poison_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """A weight of the module set to NaN at the end of optimizer step `step`."""
    original = CausalLMModule.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == step:
            with torch.no_grad():
                next(self.parameters())[0, 0] = float("nan")
        return original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(CausalLMModule, "on_train_batch_end", on_train_batch_end)


def finite(path: Path) -> bool:
    weights = torch.load(path, weights_only=False)["state_dict"]
    return first_nonfinite(weights.items()) is None


# The weights go NaN after step 5: the loss of step 6, read a step late, is seen at the end of step 7; without
# logged steps, the weights are seen as the step-8 checkpoint is about to be written.
@pytest.mark.parametrize("log_every, seen", [(1, "7: model.embed.weight holds NaN or inf (train/loss is nan"),
                                             (1000, "8: model.embed.weight holds NaN or inf, so nothing of it is saved")], ids=["logged loss", "checkpoint"])
def test_a_diverged_run_stops_saving_nothing_of_it_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, log_every, seen):
    poison_at(monkeypatch, 5)
    assert run(tmp_path, *MICRO, f"log_every_n_steps={log_every}") == 2
    err = capsys.readouterr().err
    (run_dir,) = run_dirs(tmp_path / "outputs")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"error: training diverged by step {seen}" in err
    assert f"the newest checkpoint, {last}, holds the last finite weights: resume from it" in err
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert checkpoint_step(last) == 4 and all(finite(p) for p in checkpoints)
    assert not (tmp_path / "output_models").exists(), "no model is exported from diverged weights"


def test_a_non_finite_loss_with_finite_weights_goes_on_and_non_finite_weights_stop():
    module = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(world_size=1, global_step=3, global_rank=0, checkpoint_callbacks=[],
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    callback = StopOnDivergence()
    module.deferred_metrics = SimpleNamespace(last={"train/loss": math.inf})  # a step fp16's scaler skipped
    callback.on_train_batch_end(trainer, module, None, None, 0)
    with torch.no_grad():
        module.bias[1] = math.nan
    callback.on_train_batch_end(trainer, module, None, None, 0)  # the same metrics: not looked at again
    module.deferred_metrics.last = {"train/loss": math.nan, "train/grad_norm": 2.0}
    with pytest.raises(TrainingDiverged, match=r"by step 3: bias holds NaN or inf \(train/loss is nan\), so nothing"):
        callback.on_train_batch_end(trainer, module, None, None, 0)


@pytest.mark.parametrize("metrics", [None, 5, ("train/loss", 3)])
def test_metrics_that_are_not_metric_names_are_refused_naming_the_argument(metrics):
    with pytest.raises(ValueError, match=r"StopOnDivergence\(metrics=.*\): metrics takes a tuple of metric names"):
        StopOnDivergence(metrics=metrics)


def test_ddp_ranks_stop_together_when_one_ranks_weights_are_not_finite(tmp_path):
    helper = Path(__file__).parent / "helpers" / "diverge_train.py"
    result = subprocess.run([sys.executable, str(helper), "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr
    results = [json.loads((tmp_path / f"result-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"step": 8, "outcome": "diverged"}] * 2
    assert result.stderr.count("error: training diverged by step 8: another rank's weights hold NaN or inf") == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch=0-step=4.ckpt"]


def test_a_diverged_sweep_point_is_a_result_kept_on_resume_and_optuna_prunes_its_trial(tmp_path, capsys):
    import optuna

    from forgather.launch.base import Job, Launcher, Outcome, Status
    from forgather.launch.optuna import OptunaSweeper
    from forgather.launch.sweep import SweepContext
    from forgather.run import main

    assert run(tmp_path, "-m", "+experiment=micro", "max_steps=12", "lr=1e-3,1e6") == 0  # a result, not a failure
    (root,) = (tmp_path / "multirun").iterdir()
    outcomes = {n: json.loads((root / str(n) / "outcome.json").read_text()) for n in (0, 1)}
    assert outcomes[0]["status"] == "ok" and outcomes[1]["status"] == "diverged"
    assert outcomes[1]["error"].startswith("TrainingDiverged: training diverged by step ")
    capsys.readouterr()
    assert main(["--resume", str(root)]) == 0
    assert f"resuming {root}: 2 finished points kept" in capsys.readouterr().out

    class Diverging(Launcher):
        def launch(self, jobs: list[Job], status: Status) -> list[Outcome]:
            return [Outcome(job.number, job.label, job.overrides, "diverged", error="TrainingDiverged: ...") for job in jobs]

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    context = SweepContext(study_dir, ["lr=tag(log, interval(1e-4, 1e-2))"], {}, lambda point: None, ["train"], Diverging(), Status(0), {})
    OptunaSweeper(n_trials=2, pruner="none").run(context)
    trials = optuna.load_study(study_name="sweep", storage=f"sqlite:///{study_dir / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
