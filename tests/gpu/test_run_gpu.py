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
    assert run(tmp_path, *overrides) == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(16))
    assert all(value == value and value < 20 for value in losses.values()), losses  # finite
    assert losses[15] < losses[0] - 0.3, losses
