"""The main job on a GPU with every loss and optimizer group option (needs CUDA; fused losses need forgather[gpu]).

Each run trains the micro experiment (tests/fixtures/runner_project) for 16 steps through `forgather.run` with
trainer=gpu (pure bf16), choosing the component the way a user does: `loss=fused`, `optimizer=adafactor_triton`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from test_run import run, run_dirs, train_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EXTRA = {"liger": "liger_kernel", "fused": "liger_kernel", "cce": "cut_cross_entropy"}


@pytest.mark.parametrize(
    "loss, optimizer",
    [(loss, "adamw") for loss in ("naive", "chunked", "liger", "cce", "fused")]
    + [("fused", optimizer) for optimizer in ("adamw_sr", "adafactor", "adafactor_triton", "adafactor_in_backward", "galore",
                                          "apollo")],
)
def test_micro_run_trains_on_gpu(tmp_path, loss, optimizer):
    if loss in EXTRA and importlib.util.find_spec(EXTRA[loss]) is None:
        pytest.skip(f"loss {loss!r} needs {EXTRA[loss]}")
    overrides = ["+experiment=micro", "trainer=gpu", f"loss={loss}", f"optimizer={optimizer}", "scheduler=constant",
                 "max_steps=16", "log_every_n_steps=1"]
    if optimizer.startswith("adafactor"):
        # Its relative step moves weights by ~lr x their RMS: the micro run's 3e-3 barely moves them in 16 steps.
        overrides.append("lr=0.03")
    if optimizer.endswith("in_backward"):
        overrides.append("gradient_clip_val=null")  # stepped inside backward: no global norm to clip by (refused)
    assert run(tmp_path, *overrides) == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(16))
    assert all(value == value and value < 20 for value in losses.values()), losses  # finite
    assert losses[15] < losses[0] - 0.3, losses


def test_no_training_step_waits_for_the_gpu_logged_steps_included(tmp_path):
    """The GPU side of tests/test_step_syncs.py: steps 2 to 7 of 8 (every other one written by the loggers) run
    under torch.cuda.set_sync_debug_mode("error"), which raises at any operation that makes the host wait for
    the device (`.item()`, a copy to pageable host memory, `nonzero` ...). The metrics of written steps reach
    the loggers through pinned copies and an event (DeferredMetrics), which it allows. Validation, saving a
    checkpoint and the last step wait on purpose and are left out."""
    import pytorch_lightning as pl

    import forgather.overrides as ovr
    from forgather.run import Runner, build_parser
    from test_run import PROJECT

    class NoWaits(pl.Callback):
        def __init__(self):
            self.watched = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            watch = 1 <= trainer.global_step < trainer.max_steps - 1
            torch.cuda.set_sync_debug_mode("error" if watch else "default")
            self.watched += watch

        def on_validation_start(self, trainer, pl_module):
            torch.cuda.set_sync_debug_mode("default")

        def on_train_end(self, trainer, pl_module):
            torch.cuda.set_sync_debug_mode("default")

    args = build_parser().parse_args([
        "-p", PROJECT, "--outputs", str(tmp_path), "+experiment=micro", "trainer=gpu", "max_steps=8",
        "log_every_n_steps=2", "gradient_clip_val=null", "checkpoint_every=100000", "++optimizer.fused=true"])
    runner = Runner.create(args, ["test"])
    watch = NoWaits()
    try:
        runner.run_point(ovr.parse(args.overrides, runner.groups, False)[0], callbacks=[watch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.watched == 6
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert sorted(train_losses(run_dir)) == [1, 3, 5, 7]  # every written step has its row


def test_a_gpu_run_stopped_by_sigterm_resumes_to_the_losses_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """The GPU side of tests/test_resume.py's SIGTERM test: pure bf16, the fused loss and TritonAdamW (whose
    states the checkpoint carries). SIGTERM arrives during step 5 (before the first periodic checkpoint, at 8);
    the run writes that step's checkpoint and stops; --resume trains on to step 16."""
    import signal

    from forgather.run import main
    from test_resume import signal_at, train_steps

    overrides = ["+experiment=micro", "trainer=gpu", "loss=fused", "optimizer=adamw", "scheduler=constant",
                 "log_every_n_steps=1", "checkpoint_every=8"]
    assert run(tmp_path / "whole", *overrides, "max_steps=16") == 0
    (whole,) = run_dirs(tmp_path / "whole" / "outputs")
    signal_at(monkeypatch, 5, signal.SIGTERM)
    assert run(tmp_path / "parts", *overrides, "max_steps=5000") == 128 + signal.SIGTERM
    monkeypatch.undo()
    (parts,) = run_dirs(tmp_path / "parts" / "outputs")
    assert "stopped: SIGTERM at step 5: checkpoint saved:" in capsys.readouterr().err
    assert main(["--resume", str(parts), "max_steps=16"]) == 0
    assert train_steps(parts) == list(range(16))
    expected, resumed = train_losses(whole), train_losses(parts)
    print("losses, uninterrupted vs stopped and resumed:", [(expected[s], resumed[s]) for s in range(16)])
    assert all(abs(expected[s] - resumed[s]) < 2e-2 for s in range(16)), (expected, resumed)


def test_a_gpu_run_whose_weights_go_nan_stops_before_any_checkpoint_of_them(tmp_path, monkeypatch, capsys):
    """The GPU side of tests/test_divergence.py: pure bf16, the logged loss read through pinned copies."""
    from test_divergence import finite, poison_at

    poison_at(monkeypatch, 5)
    overrides = ["+experiment=micro", "trainer=gpu", "loss=fused", "optimizer=adamw", "scheduler=constant", "max_steps=20",
                 "log_every_n_steps=1"]
    assert run(tmp_path, *overrides) == 2
    assert "error: training diverged by step 7: model.embed.weight holds NaN or inf (train/loss is nan" in capsys.readouterr().err
    (run_dir,) = run_dirs(tmp_path / "outputs")
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["epoch=0-step=4.ckpt", "last.ckpt"] and all(finite(p) for p in checkpoints)
