"""A user's mistakes with `forgather convert` and `forgather export` are one line naming the file and what to
do, exit status 2, and never cost the user a file: a damaged model directory, a length of 0, a destination
below a file, an --out that exists or belongs to the run being exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from forgather.cli.main import main as forgather_main
from forgather.convert.hf import hf_to_forgather
from test_convert import native_dir, random_hf_model, tokenizer  # noqa: F401 (fixtures)
from test_run import finished

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    random_hf_model("llama", 64).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_an_unsupported_architecture_names_its_config_file(tmp_path, capsys):
    transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert forgather_main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    assert error_line(capsys) == (f"error: {tmp_path / 'gpt2' / 'config.json'}: model_type 'gpt2' is not convertible; "
                                  "supported: llama, mistral, qwen3\n")


@pytest.mark.parametrize("content, what", [
    ({"model_type": "my_new_arch"}, "model_type 'my_new_arch' is"),
    ({"hidden_size": 8}, "no model_type: the model is"),
], ids=["unknown_to_transformers", "no_model_type"])
def test_a_model_type_transformers_does_not_know_names_the_supported_ones(tmp_path, capsys, content, what):
    """transformers' own message came instead: "does not recognize this architecture ... pip install --upgrade"."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(content))
    assert forgather_main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert error_line(capsys) == (f"error: {tmp_path / 'src' / 'config.json'}: {what} not convertible; "
                                  "supported: llama, mistral, qwen3\n")


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    random_hf_model("llama", 64).save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    return tmp_path / "sharded"


def test_a_missing_shard_is_one_line_naming_it_and_the_index(sharded_dir, tmp_path, capsys):
    """Only "No such file or directory: PATH" came, with nothing about the index or what to do."""
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    shards[1].unlink()
    assert forgather_main(["convert", str(sharded_dir), str(tmp_path / "out")]) == 2
    assert error_line(capsys) == (f"error: {shards[1]}: missing; model.safetensors.index.json lists it among the "
                                  f"checkpoint's {len(shards)} files: copy the whole checkpoint again\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("index", ["{", "[]", '{"weight_map": ["model-00001.safetensors"]}'])
def test_a_damaged_shard_index_is_one_line_naming_it(sharded_dir, tmp_path, capsys, index):
    """A cut index was "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)", naming no file."""
    (sharded_dir / "model.safetensors.index.json").write_text(index)
    assert forgather_main(["convert", str(sharded_dir), str(tmp_path / "out")]) == 2
    assert error_line(capsys) == (f"error: {sharded_dir / 'model.safetensors.index.json'}: not a safetensors index (a "
                                  "JSON object whose weight_map maps each tensor to its file); copy it again from "
                                  "where the model came from\n")


@pytest.mark.parametrize("option", ["--max-length", "--pad-vocab-to-multiple-of"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_length_below_one_is_refused_before_any_work(hf_dir, tmp_path, capsys, option, value):
    """--max-length 0 was silently ignored, -3 written into the config; --pad-vocab-to-multiple-of 0 divided by 0."""
    with pytest.raises(SystemExit) as exit:
        forgather_main(["convert", str(hf_dir), str(tmp_path / "out"), option, value, "--add-tokens", "zz"])
    assert exit.value.code == 2
    assert f"{option}: '{value}': a whole number of 1 or more expected" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_destination_below_a_file_is_one_line_naming_the_file(hf_dir, capsys):
    assert forgather_main(["convert", str(hf_dir), str(hf_dir / "config.json" / "out")]) == 2
    assert error_line(capsys) == (f"error: {hf_dir / 'config.json' / 'out'}: {hf_dir / 'config.json'} is a file, not a "
                                  "directory; choose a destination outside it\n")


def test_truncated_forgather_weights_are_one_line_saying_to_copy_again(hf_dir, tmp_path, capsys):
    native = hf_to_forgather(hf_dir, tmp_path / "native")
    os.truncate(native / "model.safetensors", 3000)
    assert forgather_main(["convert", str(native), str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {native / 'model.safetensors'}: not a readable safetensors file (")
    assert line.endswith("; copy the model directory again\n")
    assert not (tmp_path / "out").exists() and not any(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("direction", ["from_hf", "to_hf"])
def test_weights_that_do_not_fit_their_config_are_one_line_naming_the_mismatch(hf_dir, tmp_path, capsys, direction):
    source = hf_dir if direction == "from_hf" else hf_to_forgather(hf_dir, tmp_path / "native")
    config = json.loads((source / "config.json").read_text())
    if direction == "from_hf":
        config["hidden_size"] = 64
    else:
        config["model_tree"]["hidden_size"] = 64
    (source / "config.json").write_text(json.dumps(config))
    assert forgather_main(["convert", str(source), str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {source}: its weights do not fit its config.json (size mismatch for embed.weight")
    assert line.endswith("; the two come from different models: copy the model directory again\n")


# --- forgather export --out ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return finished(tmp_path_factory.mktemp("run"), "+experiment=micro", "scheduler=constant", "max_steps=4")


def files_state(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_refuses_an_out_that_exists_or_belongs_to_the_run(run_dir, tmp_path, capsys):
    """An existing --out was replaced unasked (a user's directory, even the run's last.ckpt, moved aside as a
    hidden .last.ckpt.old-PID); --overwrite would have replaced the run itself."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep").write_text("mine")
    before = files_state(run_dir, mine)
    last = run_dir / "checkpoints" / "last.ckpt"
    refusals = {
        (str(mine),): f"{mine} already exists; choose a new destination, or pass --overwrite to replace it",
        (str(last), "--overwrite"): f"{last}: the destination is the source; replacing it would delete the run being "
                                    "exported, --overwrite or not; choose a new destination",
        (str(run_dir.parent), "--overwrite"): f"{run_dir.parent}: the destination holds the source {run_dir}",
        (str(run_dir / "snapshot"), "--overwrite"): f"{run_dir / 'snapshot'}: part of the run {run_dir}, --overwrite "
                                                    "or not; choose a new destination",
    }
    for out, message in refusals.items():
        checkpoint = ["--checkpoint", str(last)] if out[0] == str(last) else []
        assert forgather_main(["export", str(run_dir), *checkpoint, "--out", *out]) == 2
        assert error_line(capsys).startswith(f"error: {message}")
    assert files_state(run_dir, mine) == before


def test_export_overwrite_replaces_out_and_clears_a_killed_exports_staging(run_dir, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("an older export")
    killed = tmp_path / f".model.tmp-{2**22 + 7}"  # above any pid Linux hands out: its process is gone
    killed.mkdir()
    (killed / "model.safetensors").write_text("half")
    assert forgather_main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out == f"exported model: {out}\n"
    assert (out / "model.safetensors").is_file() and not (out / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def kill_between_renames(dst: Path, aside: str, staging: str) -> None:
    """Replace `dst` in a child process that dies (os._exit: no cleanup runs) right after moving the old `dst`
    aside, before moving the new one in: what a kill at that moment leaves."""
    script = (
        "import os, sys\nfrom pathlib import Path\nfrom forgather.convert.output import replace_with\n"
        "dst, aside, staging = Path(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
        "new = dst.with_name(staging.format(name=dst.name, pid=os.getpid()))\n"
        "new.mkdir()\n(new / 'config.json').write_text('{\"new\": true}')\n"
        "os.replace = lambda *args: os._exit(9)\n"
        "replace_with(new, dst, aside)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(dst), aside, staging])
    assert child.returncode == 9 and not dst.exists()


def test_a_conversion_killed_between_its_renames_loses_nothing_and_the_rerun_restores_it(native_dir, tmp_path, capsys):
    """A kill between the two renames left the previous model only in a hidden .NAME.replaced-PID, and the rerun
    wrote a new one beside it without --overwrite; now the rerun puts it back first."""
    from forgather.convert.output import ASIDE, STAGING, RestoredWarning

    dst = tmp_path / "hf"
    assert forgather_main(["convert", str(native_dir), str(dst)]) == 0
    before = files_state(dst)
    kill_between_renames(dst, ASIDE, STAGING)
    capsys.readouterr()
    with pytest.warns(RestoredWarning, match=r"hf: restored the model that an interrupted conversion or export had "
                                             r"moved aside to \.hf\.replaced-\d+"):
        assert forgather_main(["convert", str(native_dir), str(dst)]) == 2
    assert error_line(capsys) == f"error: {dst} already exists; choose a new destination, or pass --overwrite to replace it\n"
    assert files_state(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "native"]  # the dead conversion's staging removed
    assert forgather_main(["convert", str(native_dir), str(dst), "--overwrite"]) == 0
    assert files_state(dst) == before  # the same conversion again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "native"]


def test_ctrl_c_between_the_renames_puts_the_previous_destination_back(native_dir, tmp_path, monkeypatch):
    from forgather.convert.hf import forgather_to_hf

    dst = forgather_to_hf(native_dir, tmp_path / "hf")
    before = files_state(dst)
    replace = os.replace

    def interrupted(source, target):
        if Path(target) == dst:
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        forgather_to_hf(native_dir, dst, overwrite=True)
    assert files_state(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "native"]


def test_an_export_killed_between_its_renames_is_put_back_and_refused_without_overwrite(run_dir, tmp_path, capsys):
    """`forgather export` left the previous --out hidden in .NAME.old-PID and wrote a new one without --overwrite."""
    from forgather.callbacks.model_export import ASIDE, STAGING
    from forgather.convert.output import RestoredWarning

    out = tmp_path / "model"
    assert forgather_main(["export", str(run_dir), "--out", str(out)]) == 0
    (out / "mine").write_text("a note of the user's")
    before = files_state(out)
    kill_between_renames(out, ASIDE, STAGING)
    capsys.readouterr()
    with pytest.warns(RestoredWarning, match=r"model: restored the model"):
        assert forgather_main(["export", str(run_dir), "--out", str(out)]) == 2
    assert error_line(capsys).startswith(f"error: {out} already exists")
    assert files_state(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert forgather_main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "mine").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_run_restarting_after_its_export_was_killed_between_renames_keeps_the_previous_model(tmp_path):
    """ExportModel.setup deleted the dead export's .NAME.old-PID, the only copy of the previous model."""
    from types import SimpleNamespace

    from forgather.callbacks.model_export import ASIDE, STAGING, ExportModel
    from forgather.convert.output import RestoredWarning

    out = tmp_path / "output_models" / "micro"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_text("the previous model")
    kill_between_renames(out, ASIDE, STAGING)
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path / "run"))
    with pytest.warns(RestoredWarning):
        ExportModel(out, "micro", model_config={}).setup(trainer, None, "fit")
    assert (out / "model.safetensors").read_text() == "the previous model"
    assert sorted(p.name for p in out.parent.iterdir()) == ["micro"]  # the dead export's staging removed
