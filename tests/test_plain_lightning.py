"""A plain Lightning user's script (tests/helpers/plain_lightning_train.py) trains with Forgather's pieces."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parent / "helpers" / "plain_lightning_train.py"


def train(out: Path, *options: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), "--steps", "30", *options], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("plain_lightning"))


@pytest.fixture(scope="module")
def pipelined_dir(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("plain_lightning_pipelined"), "--pipeline")


def test_the_script_uses_no_templates_or_configs():
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    forgather = {name for name in imported if name.startswith("forgather")}
    assert {"forgather.models.causal_lm", "forgather.loss", "forgather.optim", "forgather.callbacks.snapshot", "forgather.callbacks.job_control", "forgather.strategies"} <= forgather
    assert not any(name.startswith(("forgather.template", "forgather.graph", "forgather.project", "forgather.run", "forgather.lightning")) for name in forgather)


def test_the_loss_falls(run_dir):
    losses = json.loads((run_dir / "losses.json").read_text())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_the_snapshot_records_the_hyperparameters_and_the_script(run_dir):
    snapshot = run_dir / "snapshot"
    assert yaml.safe_load((snapshot / "config.yaml").read_text())["hidden_size"] == 64
    assert (snapshot / "sources" / "train.py").read_text() == SCRIPT.read_text()
    assert str(SCRIPT) in (snapshot / "command.txt").read_text()


def test_two_pipeline_stages_on_two_processes_give_the_losses_of_one(run_dir, pipelined_dir):
    single = json.loads((run_dir / "losses.json").read_text())
    pipelined = json.loads((pipelined_dir / "losses.json").read_text())
    assert pipelined == pytest.approx(single, rel=1e-5)
    assert yaml.safe_load((pipelined_dir / "snapshot" / "config.yaml").read_text())["pipeline"] is True
