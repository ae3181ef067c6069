"""The strategy templates (conf/strategy/): each one configures its Lightning strategy, and `strategy=ddp` /
`strategy=pipeline` train from the runner on two CPU processes (gloo) that share one run directory."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from forgather.graph.imports import import_spec
from forgather.models.layers import PreLNLayer
from forgather.run import main
from test_run import PROJECT, run_dirs

STRATEGIES = {
    "ddp": "pytorch_lightning.strategies:DDPStrategy",
    "fsdp": "pytorch_lightning.strategies:FSDPStrategy",
    "deepspeed": "pytorch_lightning.strategies:DeepSpeedStrategy",
    "pipeline": "forgather.strategies.pipeline:PipelineParallelStrategy",
}


def _config(capsys, *overrides: str) -> dict:
    assert main(["-p", PROJECT, "+experiment=micro", *overrides, "--cfg"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_option_gives_the_trainer_its_strategy(capsys, name):
    config = _config(capsys, f"strategy={name}")
    assert config["trainer"]["strategy"]["_target_"] == STRATEGIES[name]


def test_pipeline_options_are_config_values(capsys):
    config = _config(capsys, "strategy=pipeline", "pp_schedule=Interleaved1F1B", "n_microbatches=2",
                     "split_points=[1]")
    assert (config["pp_schedule"], config["n_microbatches"], config["split_points"]) == ("Interleaved1F1B", 2, [1])


def test_fsdp_wraps_every_transformer_layer(capsys):
    policy = _config(capsys, "strategy=fsdp")["trainer"]["strategy"]["auto_wrap_policy"]
    (spec,) = policy["_args_"][0][0]["_args_"]
    assert issubclass(PreLNLayer, import_spec(spec))


def _train(tmp_path: Path, *overrides: str) -> Path:
    # A subprocess: Lightning starts the other rank by re-running this process's command line.
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path), "+experiment=micro",
               "trainer.devices=2", "max_steps=4", "val_check_interval=2", *overrides]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    return run_dir


def _logged(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [float(row[key]) for row in csv.DictReader(file) if row.get(key)]


@pytest.fixture(scope="module")
def ddp_outputs(tmp_path_factory) -> Path:
    """One two-rank run for the tests below: each such run costs two processes' start-up."""
    outputs = tmp_path_factory.mktemp("ddp")
    _train(outputs, "strategy=ddp")
    return outputs


def test_two_ranks_launched_by_lightning_share_one_run_directory(ddp_outputs):
    (run_dir,) = run_dirs(ddp_outputs / "outputs")
    assert yaml.safe_load((run_dir / "metrics.yaml").read_text())["step"] == 4


def test_ddp_trains_from_the_runner_on_two_processes(ddp_outputs):
    (run_dir,) = run_dirs(ddp_outputs / "outputs")
    losses = _logged(run_dir, "train/loss")
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_pipeline_trains_validates_and_exports_from_the_runner(tmp_path):
    # ZBVZeroBubble: two stages a rank in a V, the first and last stage (and the tied head) on rank 0.
    run_dir = _train(tmp_path, "strategy=pipeline", "pp_schedule=ZBVZeroBubble", "num_layers=4", "n_microbatches=4")
    losses = _logged(run_dir, "train/loss")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert len(_logged(run_dir, "val/loss")) == 2
    assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    # The export at the end holds the whole model: the weights of the last (sharded) checkpoint.
    exported = load_file(tmp_path / "output_models" / "micro" / "model.safetensors")
    dcp_to_torch_save(run_dir / "checkpoints" / "last.ckpt", tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["state_dict"]
    assert exported.keys() == saved.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
