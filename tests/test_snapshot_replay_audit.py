"""`--from-snapshot RUN_DIR` replays a run from its snapshot alone, bit for bit, or says in one line a thing what
differs from the recorded run (the snapshot edited or cut, data, tokenizer, versions, environment variables)."""

from __future__ import annotations

import os
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import torch
import yaml

import forgather.callbacks.snapshot as snapshot_module
from forgather.callbacks.snapshot import Snapshot, replay_differences
from forgather.run import main
from test_run import PROJECT, run, run_dirs, train_losses

MICRO = ("+experiment=micro", "scheduler=constant", "max_steps=6")


def replay(source: Path, outputs: Path, *overrides: str) -> Path:
    assert main(["--outputs", str(outputs), "--from-snapshot", str(source), *overrides]) == 0
    (again,) = run_dirs(outputs / "outputs")
    return again


def replay_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: --from-snapshot")]


def test_an_unchanged_replay_gives_the_same_losses_and_weights_bit_for_bit_and_warns_of_nothing(tmp_path, capsys):
    assert run(tmp_path / "first", *MICRO, "seed=7") == 0  # a seed given on the command line is replayed too
    (first,) = run_dirs(tmp_path / "first" / "outputs")
    capsys.readouterr()
    again = replay(first, tmp_path / "again")
    assert replay_warnings(capsys.readouterr().err) == []
    assert yaml.safe_load((again / "snapshot" / "config.yaml").read_text())["seed"] == 7
    assert train_losses(again) == train_losses(first) and len(train_losses(first)) == 6
    losses = [{key: value for key, value in yaml.safe_load((run_dir / "metrics.yaml").read_text()).items() if "loss" in key}
              for run_dir in (first, again)]
    assert losses[0] == losses[1] and "val/loss" in losses[0]
    weights = [torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
               for run_dir in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def project_with_model_src(root: Path) -> Path:
    """A project whose config builds a target from its model_src (`.probe:value`)."""
    (root / "templates/configs").mkdir(parents=True)
    (root / "model_src").mkdir()
    (root / "model_src/probe.py").write_text("def value(x):\n    return x\n")
    (root / "meta.yaml").write_text(f"template_paths: [{os.path.join(PROJECT, 'templates')!r}]\n")
    (root / "templates/configs/probed.yaml").write_text(textwrap.dedent("""\
        -- extends 'configs/micro.yaml'
        [targets]
        == super()
        probe: !call:.probe:value { x: 1 }
        """))
    return root


def test_a_replay_of_a_replay_builds_the_model_source_the_first_run_recorded(tmp_path, capsys):
    project = project_with_model_src(tmp_path / "project")
    assert main(["-p", str(project), "--outputs", str(tmp_path / "first"), "+experiment=probed", "max_steps=2"]) == 0
    (first,) = run_dirs(tmp_path / "first" / "outputs")
    (project / "model_src/probe.py").write_text("def value(x):\n    raise RuntimeError('edited after the run')\n")
    (project / "templates/configs/probed.yaml").write_text("-- extends 'configs/gone.yaml'\n")  # replays never render
    for name in [name for name in sys.modules if name.startswith("forgather_local.")]:  # as a new process would
        del sys.modules[name]
    second = replay(first, tmp_path / "second", "lr=1e-3")
    capsys.readouterr()
    third = replay(second, tmp_path / "third")  # before: built from the edited project source, and failed
    assert replay_warnings(capsys.readouterr().err) == []
    assert train_losses(third) == train_losses(second)
    assert (second / "snapshot/sources/model_src/probe.py").read_text() == "def value(x):\n    return x\n"
    assert "def construct(" in (second / "snapshot/model_code.py").read_text()
    assert yaml.safe_load((second / "snapshot/overrides.yaml").read_text()) == ["lr=1e-3"]
    assert yaml.safe_load((second / "snapshot/meta.yaml").read_text())["from_run"] == str(first)
    assert yaml.safe_load((second / "snapshot/config.yaml").read_text())["lr"] == 1e-3


def write_documents(path: Path, words: str) -> None:
    path.write_text("".join(f'{{"text": "document {n}: {words} {n * 7} {words}"}}\n' for n in range(80)))


def test_a_replay_names_a_data_file_edited_since_the_run(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    write_documents(data, "the quick brown fox jumps over the lazy dog")
    assert run(tmp_path / "first", *MICRO, "max_steps=2", "data=jsonl", f"data_path={data}") == 0
    (first,) = run_dirs(tmp_path / "first" / "outputs")
    recorded = yaml.safe_load((first / "snapshot/inputs.yaml").read_text())
    assert recorded[str(data)]["fingerprint"]["size"] == data.stat().st_size
    write_documents(data, "a slow green turtle walks under the busy cat")
    capsys.readouterr()
    replay(first, tmp_path / "again")
    (line,) = replay_warnings(capsys.readouterr().err)
    assert line.startswith(f"warning: --from-snapshot {first}: input {data}: not what the run read (")
    assert line.endswith("the replay reads it as it is now: restore it to get the run's losses")


def test_a_replay_names_a_tokenizer_directory_changed_or_removed_since_the_run(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"vocab": 1}')
    config = {"tokenizer_path": str(tokenizer)}
    Snapshot(tmp_path / "run", config=config).write()
    assert replay_differences(tmp_path / "run", config) == []
    (tokenizer / "tokenizer.json").write_text('{"vocab": 2}')  # the same size, another content
    assert replay_differences(tmp_path / "run", config) == [
        f"input {tokenizer}: not what the run read (its content differs); the replay reads it as it is now: restore "
        f"it to get the run's losses"]
    (tokenizer / "tokenizer.json").unlink()
    tokenizer.rmdir()
    assert [line.split(";")[0] for line in replay_differences(tmp_path / "run", config)] == [
        f"input {tokenizer}: not what the run read (it is missing here)"]
    assert replay_differences(tmp_path / "run", {"tokenizer_path": "elsewhere/tok"}) == [], \
        "other data given on purpose (an override) is not compared"


def test_other_package_versions_code_and_environment_variables_are_named_one_line_each(tmp_path, monkeypatch):
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "torch" else real_version(name))
    monkeypatch.setattr(snapshot_module, "_forgather_code_hash", lambda: "0" * 64)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setenv("HF_TOKEN", "secret")
    Snapshot(tmp_path / "run", config={}).write()
    assert "secret" not in (tmp_path / "run/snapshot/environment.yaml").read_text()
    monkeypatch.undo()
    lines = replay_differences(tmp_path / "run", {})
    assert lines == [
        f"torch {torch.__version__} here, 0.0.1 in the run: losses may differ; install torch==0.0.1 to replay it exactly",
        "Forgather's code differs from the run's (its git.diff and git.yaml say how it was): losses may differ; "
        "check out that code to replay it exactly",
        "environment variable CUBLAS_WORKSPACE_CONFIG is 'unset' here, ':4096:8' in the run: run the replay with "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8",
    ]


def test_a_snapshot_cut_or_edited_by_hand_is_named_one_line_a_record(tmp_path):
    model_src = tmp_path / "model_src"
    model_src.mkdir()
    for name in ("a.py", "b.py"):
        (model_src / name).write_text("x = 1\n")
    Snapshot(tmp_path / "run", config={"lr": 1e-3}, sources={"model_src": model_src}).write()
    recorded = tmp_path / "run" / "snapshot"
    for name in ("a.py", "b.py"):
        (recorded / "sources/model_src" / name).unlink()
    (recorded / "config.yaml").write_text("lr: 0.1\n")
    (recorded / "inputs.yaml").unlink()
    assert sorted(replay_differences(tmp_path / "run", {"lr": 0.1})) == [
        "snapshot/config.yaml: edited since the run recorded it; the replay uses it as it is now (restore it from a "
        "copy of the run to replay the run as it was)",
        "snapshot/inputs.yaml: missing from the snapshot; the data the run read is not checked",
        "snapshot/sources/model_src/a.py, snapshot/sources/model_src/b.py: missing from the snapshot; the model is "
        "built from the project's model source as it is now",
    ]


def test_a_python_file_the_config_imports_by_path_is_an_input_too(tmp_path):
    code = tmp_path / "layer.py"
    code.write_text("def make():\n    return 1\n")
    config = {"model": {"_target_": f"{code}:make"}, "trainer": {"default_root_dir": str(tmp_path)}}
    Snapshot(tmp_path / "run", config=config).write()
    assert list(yaml.safe_load((tmp_path / "run/snapshot/inputs.yaml").read_text())) == [str(code)], \
        "the file a target imports is an input; a directory the run writes to is not"
    code.write_text("def make():\n    return 2\n")
    assert [line.split(" (")[0] for line in replay_differences(tmp_path / "run", config)] == [f"input {code}: not what the run read"]


def test_a_sweep_point_is_replayed_with_the_threads_its_launcher_gave_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the local launcher sets for points that share the cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Snapshot(tmp_path / "point", config={}).write()
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_NUM_THREADS")
    with snapshot_module.recorded_threads(tmp_path / "point"):
        assert torch.get_num_threads() == 1
        assert replay_differences(tmp_path / "point", {}) == []
    assert torch.get_num_threads() == before


def test_an_environment_variable_the_config_reads_is_recorded_and_compared(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"data_field": "${oc.env:MY_FIELD}"})  # config.yaml keeps it: a replay reads it again
    monkeypatch.setenv("MY_FIELD", "text")
    Snapshot(tmp_path / "run", config=config).write()
    assert replay_differences(tmp_path / "run", config) == []
    monkeypatch.setenv("MY_FIELD", "body")
    assert replay_differences(tmp_path / "run", config) == [
        "environment variable MY_FIELD is 'body' here, 'text' in the run: run the replay with MY_FIELD=text"]


def test_a_snapshot_older_than_the_checks_is_said_once(tmp_path):
    (tmp_path / "run/snapshot").mkdir(parents=True)
    (tmp_path / "run/snapshot/config.yaml").write_text("lr: 0.1\n")
    assert replay_differences(tmp_path / "run", {"lr": 0.1}) == [
        "snapshot/checksums.yaml, snapshot/inputs.yaml, snapshot/environment.yaml: not in the snapshot (written before "
        "Forgather recorded them, or deleted): its files, data, versions and environment are not checked"]


def test_regenerated_shards_and_a_glob_that_matches_more_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot_module, "HASHED_BYTES", 0)  # shards too large to hash: size and mtime of each
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(2):
        (shards / f"shard-{n}.bin").write_bytes(bytes(64))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "a"}\n')
    config = {"data_path": str(shards), "data_sources": [f"{corpus}/*.jsonl"]}
    Snapshot(tmp_path / "run", config=config).write()
    assert replay_differences(tmp_path / "run", config) == []
    (shards / "shard-1.bin").write_bytes(bytes(64))  # prepared again: the same sizes, written later
    os.utime(shards / "shard-1.bin", ns=(1, 1))
    (corpus / "b.jsonl").write_text('{"text": "b"}\n')
    assert [line.split(";")[0] for line in replay_differences(tmp_path / "run", config)] == [
        f"input {corpus}/*.jsonl: not what the run read (files: 1 then, 2 now)",
        f"input {shards}: not what the run read (written again since: same sizes, other times"]
