"""The main job end to end on the micro experiment: train, snapshot, reproduce, kill and resume, sweep."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from forgather.run import latest_checkpoint, main
from helpers.kill import kill_when

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")


def run(tmp_path: Path, *arguments: str) -> int:
    return main(["-p", PROJECT, "--outputs", str(tmp_path), *arguments])


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("snapshot") if p.is_dir())


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")}


def finished(root: Path, *arguments: str) -> Path:
    """The run directory of one run under `root` that finished (the runner's exit code 0)."""
    assert run(root, *arguments) == 0
    (run_dir,) = run_dirs(root / "outputs")
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return finished(tmp_path_factory.mktemp("first"), "+experiment=micro", "scheduler=constant", "max_steps=16")


def test_a_run_trains_and_records_its_metrics(finished_run):
    losses = train_losses(finished_run)
    assert sorted(losses) == list(range(16))
    assert losses[15] < losses[0] - 0.3
    metrics = yaml.safe_load((finished_run / "metrics.yaml").read_text())
    assert metrics["step"] == 16 and "val/loss" in metrics
    assert (finished_run / "checkpoints" / "last.ckpt").is_file() and (finished_run / "tb").is_dir()
    assert not list(finished_run.rglob("*.tmp-*")), "no temporary files left behind"


def test_the_snapshot_holds_what_reproduction_needs(finished_run):
    snapshot = finished_run / "snapshot"
    config = yaml.safe_load((snapshot / "config.yaml").read_text())
    assert config["output_dir"] == str(finished_run) and config["max_steps"] == 16
    assert yaml.safe_load((snapshot / "overrides.yaml").read_text()) == ["+experiment=micro", "scheduler=constant", "max_steps=16"]
    assert "forgather.run" in (snapshot / "command.txt").read_text()
    assert "torch==" in (snapshot / "pip_freeze.txt").read_text()
    assert (snapshot / "sources" / "templates" / "project" / "configs" / "micro.yaml").is_file()
    assert (snapshot / "sources" / "templates" / "conf" / "base" / "causal_lm.yaml").is_file()
    assert "def construct(" in (snapshot / "model_code.py").read_text()
    meta = yaml.safe_load((snapshot / "meta.yaml").read_text())
    assert meta["experiment"] == "micro" and meta["template"] == "configs/micro.yaml"


def test_the_trained_model_is_exported_for_transformers(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = finished_run.parents[2] / "output_models" / "micro"
    hf_model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([tokenizer("The object is returned.")["input_ids"]])
    namespace: dict = {}
    exec((finished_run / "snapshot" / "model_code.py").read_text(), namespace)
    model = namespace["construct"]()()
    state = torch.load(finished_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, model.eval()(ids), atol=1e-5)


def test_from_snapshot_reproduces_the_loss_curve(finished_run, tmp_path):
    assert main(["--outputs", str(tmp_path), "--from-snapshot", str(finished_run)]) == 0
    (again,) = run_dirs(tmp_path / "outputs")
    assert again != finished_run
    assert train_losses(again) == train_losses(finished_run)


def test_killed_run_resumes_from_its_last_checkpoint(finished_run, tmp_path):
    command = [sys.executable, "-m", "forgather.run", "-p", PROJECT, "--outputs", str(tmp_path)]
    child = subprocess.Popen([*command, "+experiment=micro", "scheduler=constant", "max_steps=5000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(child, lambda: any(tmp_path.glob("outputs/micro/*/checkpoints/epoch=0-step=8.ckpt")), 120,
              "the run ended before its second checkpoint")
    (killed,) = run_dirs(tmp_path / "outputs")
    resumed_from = torch.load(latest_checkpoint(killed), map_location="cpu", weights_only=False)["global_step"]
    assert resumed_from >= 8, "the newest checkpoint is not the one the run wrote last"
    assert main(["--resume", str(killed), "max_steps=16"]) == 0
    losses, reference = train_losses(killed), train_losses(finished_run)
    assert sorted(losses) == list(range(16)), "the rows logged before the kill are kept"
    assert all(losses[step] == pytest.approx(reference[step], abs=1e-5) for step in range(16))
    assert yaml.safe_load((killed / "metrics.yaml").read_text())["step"] == 16


def test_a_two_point_sweep_runs_both_and_prints_a_table(tmp_path, capsys):
    assert run(tmp_path, "-m", "+experiment=micro", "max_steps=6", "lr=1e-3,3e-3") == 0
    out = capsys.readouterr().out
    points = run_dirs(tmp_path / "multirun")
    assert [p.name for p in points] == ["0", "1"]
    assert [yaml.safe_load((p / "snapshot" / "config.yaml").read_text())["lr"] for p in points] == [1e-3, 3e-3]
    assert "lr=0.001" in out and "lr=0.003" in out and "val/loss" in out


@pytest.mark.parametrize("optimizer, extra", [("adafactor", []), ("adamw", []), ("adamw", ["bucket_size=4096"])],
                         ids=["adafactor", "adamw", "adamw-buckets"])
def test_optimizer_in_backward_trains_like_the_plain_optimizer(tmp_path, optimizer, extra):
    common = ["+experiment=micro", "gradient_clip_val=null", "lr=3e-2", "max_steps=8"]
    assert run(tmp_path / "plain", *common, f"optimizer={optimizer}") == 0
    assert run(tmp_path / "in_backward", *common, f"optimizer={optimizer}_in_backward", *extra) == 0
    (plain,) = run_dirs(tmp_path / "plain" / "outputs")
    (in_backward,) = run_dirs(tmp_path / "in_backward" / "outputs")
    expected, losses = train_losses(plain), train_losses(in_backward)
    assert losses == pytest.approx(expected, abs=1e-4) and losses[7] < losses[0]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "galore", "apollo"])
def test_every_cpu_optimizer_template_trains(tmp_path, optimizer):
    assert run(tmp_path, "+experiment=micro", f"optimizer={optimizer}", "max_steps=4", "val_check_interval=4") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    metrics = yaml.safe_load((run_dir / "metrics.yaml").read_text())
    assert metrics["step"] == 4 and metrics["val/loss"] < 6.0  # ln(320) = 5.77 at the start


def test_latest_checkpoint_takes_sharded_directories_too(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step=4.ckpt").mkdir(parents=True)
    (checkpoints / "step=4.ckpt" / "meta.pt").write_bytes(b"")
    (checkpoints / "partial.ckpt").mkdir()  # a directory without meta.pt is not a checkpoint
    assert latest_checkpoint(tmp_path) == checkpoints / "step=4.ckpt"
    os.utime(checkpoints / "step=4.ckpt", (1, 1))
    (checkpoints / "step=2.ckpt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == checkpoints / "step=2.ckpt"


def test_the_snapshot_model_code_follows_the_overrides(tmp_path):
    assert run(tmp_path, "+experiment=micro", "max_steps=1", "hidden_size=48", "num_heads=3", "num_kv_heads=1") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert "def construct(hidden_size=48," in (run_dir / "snapshot" / "model_code.py").read_text()


def test_a_run_records_the_configs_it_took_from_another_project_and_a_replay_refuses_them_changed(tmp_path, capsys):
    import textwrap

    (tmp_path / "models/templates/configs").mkdir(parents=True)
    (tmp_path / "models/meta.yaml").write_text("name: models\n")
    sibling = tmp_path / "models/templates/configs/sizes.yaml"
    sibling.write_text("size: 3\n")
    (tmp_path / "train/templates/configs").mkdir(parents=True)
    (tmp_path / "train/meta.yaml").write_text(f"template_paths: [{os.path.join(PROJECT, 'templates')!r}]\n")
    (tmp_path / "train/templates/configs/exp.yaml").write_text(textwrap.dedent("""\
        -- extends 'configs/micro.yaml'
        [targets]
        == super()
        sibling_size: !call:forgather:from_project { project_dir: "{{ joinpath(project_dir, '../models') }}", targets: size }
        """))
    assert main(["-p", str(tmp_path / "train"), "--outputs", str(tmp_path), "+experiment=exp", "max_steps=2"]) == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    meta = yaml.safe_load((run_dir / "snapshot" / "meta.yaml").read_text())
    assert [record["config"] for record in meta["from_project"]] == [f"{tmp_path / 'models'}:configs/sizes.yaml"]
    assert (run_dir / "snapshot/sources/from_project/0_models/templates/configs/sizes.yaml").read_text() == "size: 3\n"
    sibling.write_text("size: 4\n")
    capsys.readouterr()
    assert main(["--from-snapshot", str(run_dir), "--outputs", str(tmp_path / "again")]) == 2
    assert re.search(r"from_project \S+/models:configs/sizes.yaml: .*other YAML than when the run was recorded.* put them back",
                     capsys.readouterr().err)
    assert not list((tmp_path / "again").rglob("snapshot")), "the refused replay left no run behind"
