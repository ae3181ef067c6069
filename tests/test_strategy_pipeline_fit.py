"""`trainer.fit` of an unchanged CausalLMModule under PipelineParallelStrategy (two gloo processes): the same
losses as one process (gradient clipping and accumulation included), a sharded checkpoint that resumes exactly,
is written atomically, and loads into a single-device module."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgather.lightning.module import CausalLMModule
from forgather.loss.naive import NaiveLoss
from forgather.strategies import load_sharded_checkpoint
from forgather.strategies.checkpoint import swap_into_place

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from pipeline_models import causal_lm, packed_batch  # noqa: E402
from ranks import start, start_ranks, wait_all  # noqa: E402

TRAIN = Path(__file__).parent / "helpers" / "pipeline_train.py"


def _start(out: Path, *args: str, devices: int = 2) -> list[subprocess.Popen]:
    out.mkdir()
    arguments = [str(TRAIN), str(out), "--devices", str(devices), *args]
    return start_ranks(arguments, devices) if devices > 1 else [start(arguments)]


def _fit(out: Path, *args: str, devices: int = 2) -> Path:
    wait_all(_start(out, *args, devices=devices))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fit")
    single, pipelined, resumed = root / "single", root / "pipelined", root / "resumed"
    wait_all([*_start(single, devices=1), *_start(pipelined, "--save-at", "2")])  # independent: side by side
    _fit(resumed, "--resume", str(pipelined / "step2"))
    return {"single": single, "pipelined": pipelined, "resumed": resumed}


def _losses(out: Path, rank: int = 0) -> list[float]:
    return json.loads(Path(out, f"losses-rank{rank}.json").read_text())


def test_pipelined_fit_logs_the_single_process_losses(runs):
    assert _losses(runs["pipelined"]) == pytest.approx(_losses(runs["single"]), rel=1e-5)


def test_every_stage_sees_the_last_stages_loss(runs):
    assert _losses(runs["pipelined"], 0) == _losses(runs["pipelined"], 1)


def test_a_resumed_fit_ends_with_the_uninterrupted_weights(runs):
    for rank in (0, 1):
        uninterrupted = torch.load(runs["pipelined"] / f"state-rank{rank}.pt")
        resumed = torch.load(runs["resumed"] / f"state-rank{rank}.pt")
        assert uninterrupted.keys() == resumed.keys()
        for key, value in uninterrupted.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_a_sharded_checkpoint_loads_into_a_single_device_module(runs):
    module = load_sharded_checkpoint(runs["pipelined"] / "step2", CausalLMModule(causal_lm(seed=1), NaiveLoss()))
    batch = packed_batch()
    with torch.no_grad():
        hidden = module.model.hidden_states(batch["input_ids"], batch["position_ids"])
        loss = module.loss(hidden, module.model.lm_head_weight, batch["labels"])
    # The pipeline's third step ran on the same batch with the weights saved after the second.
    assert float(loss) == pytest.approx(_losses(runs["pipelined"])[2], rel=1e-5)


@pytest.mark.slow
def test_pipelined_fit_accumulates_gradients_like_one_process(tmp_path):
    """Every other batch is half padding: the step's gradient is the mean over all the window's tokens on both."""
    single = _fit(tmp_path / "single", "--accumulate", "2", "--varied", devices=1)
    pipelined = _fit(tmp_path / "pipelined", "--accumulate", "2", "--varied")
    assert len(_losses(pipelined)) == 6
    assert _losses(pipelined) == pytest.approx(_losses(single), rel=1e-5)


@pytest.mark.slow  # four processes
def test_two_pipeline_replicas_fit_like_one_process(runs, tmp_path):
    # Both replicas read the same batches here, so their averaged gradients are the batch's own.
    replicated = _fit(tmp_path / "replicated", "--pp-size", "2", devices=4)
    for rank in range(4):
        assert _losses(replicated, rank) == pytest.approx(_losses(runs["single"]), rel=1e-5)


def test_a_checkpoint_directory_is_swapped_into_place_whole(tmp_path):
    target, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    swap_into_place(staging, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert [p.name for p in target.iterdir()] == ["new"]
