"""One reporter for every failure of a run: `error: <where>: <what> ; <what to do>`, one line, no traceback."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from forgather.errors import UserError, report
from forgather.run import main

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")


def run(tmp_path, capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["-p", PROJECT, "--outputs", str(tmp_path), "+experiment=micro", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# -- the reporter ---------------------------------------------------------------------------------------


def test_a_user_error_is_one_line_with_its_notes(capsys):
    error = UserError("conf/x.yaml:3: bad value")
    error.add_note("set by the override x=1")
    assert report(error) == 2
    assert capsys.readouterr().err == "error: conf/x.yaml:3: bad value ; set by the override x=1\n"


def test_a_full_disk_found_under_a_wrapping_error_is_one_line(capsys):
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/a.tmp", None, "/out/run/last.ckpt")
        except OSError as cause:
            raise RuntimeError("checkpoint write failed") from cause
    except RuntimeError as error:
        assert report(error) == 2
    err = capsys.readouterr().err
    assert err == (f"error: /out/run/last.ckpt: {os.strerror(errno.ENOSPC)} ; free some space, then go on with --resume RUN_DIR: the "
                   f"checkpoints written before are whole (each is written aside and renamed into place) ; a run's "
                   f"keep_checkpoints=N keeps only its newest N step checkpoints\n")


def test_a_bug_prints_its_traceback_and_exit_code_1(capsys):
    try:
        raise AttributeError("'int' object has no attribute 'finalize'")
    except AttributeError as error:
        assert report(error) == 1
    assert "Traceback" in capsys.readouterr().err


def test_forgather_debug_adds_the_traceback_to_a_user_error(capsys, monkeypatch):
    monkeypatch.setenv("FORGATHER_DEBUG", "1")
    try:
        raise UserError("where: what ; do this")
    except UserError as error:
        assert report(error) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: where: what ; do this\n")


def test_the_runner_reports_without_importing_the_cli():
    probe = (
        "import sys\nfrom forgather.run import main\n"
        f"code = main(['-p', {PROJECT!r}, '--cfg', '+experiment=micro', 'max_steps=many'])\n"
        "print(code, any(name.startswith('forgather.cli') for name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"] and "max_steps=many" in result.stderr


# -- a run's environment ----------------------------------------------------------------------------------


def test_a_read_only_output_directory_is_one_line(tmp_path, capsys, monkeypatch):
    read_only = tmp_path / "ro"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # as root, permissions would not stop the write: refuse like EROFS does
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code, _, err = run(read_only, capsys, "max_steps=1")
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {read_only}/outputs/micro/")
    assert line.endswith(f": {os.strerror(errno.EROFS)} ; write elsewhere (--outputs DIR)")


def test_a_disk_filling_up_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    from forgather.lightning.checkpoint_io import AtomicCheckpointIO

    def full(self, checkpoint, path, storage_options=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/staging", None, str(path))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full)
    code, _, err = run(tmp_path, capsys, "max_steps=4", "checkpoint_every=2")
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.endswith(f"step=2.ckpt: {os.strerror(errno.ENOSPC)} ; free some space, then go on with --resume RUN_DIR: "
                         f"the checkpoints written before are whole (each is written aside and renamed into place) ; "
                         f"a run's keep_checkpoints=N keeps only its newest N step checkpoints")


def test_triton_adafactor_on_cpu_says_it_needs_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(tmp_path, capsys, "optimizer=adafactor_triton", "max_steps=1")
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "TritonAdafactor needs a CUDA device (a GPU)" in line and "optimizer=adafactor" in line


def test_a_block_size_beyond_the_machines_memory_is_refused_before_the_forward(tmp_path, capsys, monkeypatch):
    from forgather.lightning import memory

    monkeypatch.setattr(memory, "device_memory", lambda device: 64 * 2**20)
    code, _, err = run(tmp_path, capsys, "block_size=4096", "max_steps=1")
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "x 4096 tokens (batch_size x block_size) needs at least" in line and "the cpu device has 0.1 GiB" in line
    assert line.endswith("lower block_size or batch_size ; set by the override block_size=4096")


def test_the_estimate_refuses_ten_million_tokens_without_allocating_them():
    from torch import nn

    from forgather.lightning.memory import check_batch_fits
    from forgather.models.causal_lm import CausalLM

    model = CausalLM(vocab_size=320, hidden_size=32, num_layers=2, layer_factory=lambda h: nn.Identity(), norm_factory=nn.LayerNorm)
    # 4 x 10M tokens x (2 layers x 16 x 32 + 320 logits) x 4 bytes
    with pytest.raises(UserError, match=r"a batch of 4 x 10000000 tokens .* needs at least 200\.3 GiB of activations to train"):
        check_batch_fits(model, torch.Size([4, 10_000_000]), torch.device("cpu"), 4, training=True)
    check_batch_fits(model, torch.Size([4, 32]), torch.device("cpu"), 4, training=True)


def test_a_construction_error_names_the_override_behind_it(tmp_path, capsys):
    code, _, err = run(tmp_path, capsys, "val_check_interval=-5")
    assert code == 2
    (line,) = error_lines(err)
    assert "constructing trainer" in line and "invalid value -5 for val_check_interval" in line
    assert line.endswith("; set by the override val_check_interval=-5")
    assert list((tmp_path / "outputs" / "micro").iterdir()) == [], "no empty run directory is left behind"


@pytest.mark.parametrize("override, message, note", [
    ("hidden_size=-5", "Attention: hidden_size=-5 must be a positive integer", "; set by the override hidden_size=-5"),
    ("hidden_size=35", "num_heads=2 does not divide hidden_size=35", "; set by the override hidden_size=35"),
    ("intermediate_size=0", "SwiGLU: intermediate_size=0 must be a positive integer",
     "; set by the override intermediate_size=0")])
def test_a_model_size_below_one_is_one_line_naming_the_module_and_the_override(tmp_path, capsys, override, message,
                                                                                note):
    """A size below one fails where it is first used, the config's rotary table or the model built inside
    Lightning's fit (configure_model), before torch meets a negative dimension."""
    code, _, err = run(tmp_path, capsys, override, "max_steps=1")
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert message in line and line.endswith(note)


def test_a_run_that_fails_before_its_first_checkpoint_says_how_to_start_over_not_to_resume(tmp_path, capsys):
    """`--resume` refuses a run directory without a checkpoint, so the failed run does not offer it."""
    code, out, _ = run(tmp_path, capsys, "intermediate_size=0", "max_steps=1")  # fails inside fit: configure_model
    assert code == 2
    (line,) = [line for line in out.splitlines() if line.startswith("run directory:") and "(" in line]
    assert line.endswith("(no checkpoint yet; start over with --from-snapshot "
                         f"{line.split()[2]})") and "--resume" not in line


def test_each_model_module_refuses_sizes_below_one_or_not_integers():
    from forgather.models.attention import Attention
    from forgather.models.causal_lm import CausalLM
    from forgather.models.embedding import TokenEmbedding
    from forgather.models.feedforward import SwiGLU

    with pytest.raises(ValueError, match=r"Attention: num_kv_heads=-2 must be a positive integer"):
        Attention(64, 4, num_kv_heads=-2)
    with pytest.raises(ValueError, match=r"TokenEmbedding: vocab_size=0 must be a positive integer"):
        TokenEmbedding(0, 8)
    with pytest.raises(ValueError, match=r"SwiGLU: intermediate_size=12.5 must be a positive integer"):
        SwiGLU(8, 12.5)
    with pytest.raises(ValueError, match=r"Attention: hidden_size=True must be a positive integer"):
        Attention(True, 1)
    with pytest.raises(ValueError, match=r"CausalLM: num_layers=-1 must be a positive integer"):
        CausalLM(vocab_size=16, hidden_size=8, num_layers=-1, layer_factory=None, norm_factory=None)
    assert Attention(64, 4, num_kv_heads=2).head_dim == 16


def test_an_optimizer_error_in_its_own_words_still_names_the_override(tmp_path, capsys):
    """torch.optim says "learning rate" where the config says lr: the note names the override all the same."""
    code, _, err = run(tmp_path, capsys, "lr=-1", "max_steps=1")
    assert code == 2
    assert error_lines(err) == ["error: Invalid learning rate: -1 ; set by the override lr=-1"]


# -- sweeps -----------------------------------------------------------------------------------------------


def test_a_failing_sweep_point_prints_the_short_error_and_a_status_column(tmp_path, capsys):
    """...and does not stop the others: the second point trains (the sweep exits 1, for the failed one)."""
    code, out, err = run(tmp_path, capsys, "-m", "max_steps=2", "weight_decay=-1.0,0.0")
    assert code == 1 and "Traceback" not in err
    assert [p.parent.name for p in (tmp_path / "multirun").rglob("metrics.yaml")] == ["1"]
    assert error_lines(err) == ["error: Invalid weight_decay value: -1.0 ; set by the override weight_decay=-1.0"]
    header = next(line for line in out.splitlines() if "overrides" in line)
    columns = [cell.strip() for cell in header.split("┃")[1:-1]]
    assert columns[:3] == ["#", "overrides", "status"] and "train/loss" in columns
    failed = next(line for line in out.splitlines() if "weight_decay=-1.0" in line and "│" in line)
    cells = [cell.strip() for cell in failed.split("│")[1:-1]]
    assert cells[2] == "failed: ValueError: Invalid weight_decay value: -1.0" and cells[3:] == [""] * (len(columns) - 3)
    ok = next(line for line in out.splitlines() if "weight_decay=0.0" in line and "│" in line)
    assert [cell.strip() for cell in ok.split("│")[1:-1]][2] == "ok"


def test_warmup_beyond_max_steps_warns_in_a_sweep_and_a_run(capsys):
    assert main(["-p", PROJECT, "--cfg", "-m", "+experiment=micro", "max_steps=1,12"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: warmup_steps=2 exceeds max_steps=1: the learning rate never reaches its peak ; lower warmup_steps or raise max_steps"]
    assert main(["-p", PROJECT, "--cfg", "+experiment=micro", "lr_scheduler.lr_lambda.warmup_steps=50"]) == 0
    assert "warning: lr_scheduler.lr_lambda.warmup_steps=50 exceeds max_steps=12" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, key", [
    ((), "gradient_clip_val=1.0"),
    (("gradient_clip_val=null", "++trainer.accumulate_grad_batches=2"), "accumulate_grad_batches=2"),
])
def test_an_optimizer_inside_backward_refuses_clipping_and_accumulation_it_would_skip(tmp_path, capsys, overrides,
                                                                                       key):
    """Its steps happen before Lightning clips or accumulates: the run stops with one line, not a run that
    silently trains unclipped."""
    code, _, err = run(tmp_path, capsys, "optimizer=adamw_in_backward", "max_steps=2", *overrides)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(f"error: {key}: ") and "inside backward" in line


def test_training_on_a_gpu_without_one_is_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """trainer=gpu where torch sees no CUDA GPU: named before the model and data are built, and no run directory
    is left behind (Lightning's own "No supported gpu backend found!" came after both, and named neither)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(tmp_path, capsys, "trainer=gpu", "max_steps=1")
    assert code == 2
    assert error_lines(err) == [
        f"error: trainer.accelerator='gpu' (trainer=gpu, or -d): this machine has no CUDA GPU that torch "
        f"{torch.__version__} can use ; train on the CPU (leave trainer=gpu and -d out), or install a CUDA build "
        f"of torch"]
    assert not (tmp_path / "outputs").exists()


def test_an_output_directory_that_cannot_be_made_is_one_line_saying_how_to_choose_another(tmp_path, capsys):
    """`--outputs /proc/x` printed a bare `[Errno 2] No such file or directory: '/proc/x'`."""
    code, _, err = run(pathlib.Path("/proc/forgather-test"), capsys, "max_steps=1")
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith("error: /proc/forgather-test/outputs/micro/")
    assert line.endswith(": cannot create the run's directory (No such file or directory); choose where runs go "
                         "with --outputs DIR (or output_dir=DIR)")


def test_an_output_directory_that_is_a_file_is_one_line(tmp_path, capsys):
    """Both were a traceback from mkdir (NotADirectoryError, FileExistsError), after the config was rendered."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["-p", PROJECT, "--outputs", str(a_file), "+experiment=micro", "max_steps=1"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: --outputs {a_file}: a file, not a directory; give the directory where outputs/ and multirun/ go"]
    code, _, err = run(tmp_path, capsys, f"output_dir={a_file}", "max_steps=1")
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"error: output_dir={a_file}: {a_file} is a file; give a new or empty directory"]
    assert a_file.read_text() == "mine"


# -- a recorded run: --resume and --from-snapshot ---------------------------------------------------------


def recorded_run(directory: pathlib.Path, config: str = "output_dir: x\nlr: 0.001\n") -> pathlib.Path:
    (directory / "snapshot").mkdir(parents=True)
    (directory / "snapshot" / "config.yaml").write_text(config)
    (directory / "snapshot" / "meta.yaml").write_text("experiment: micro\n")
    return directory


@pytest.mark.parametrize("flag", ["--resume", "--from-snapshot"])
def test_a_run_directory_that_is_missing_or_incomplete_is_named_with_what_to_do(tmp_path, capsys, flag):
    """A config.yaml that does not parse and a missing meta.yaml were a YAML traceback and a bare [Errno 2]."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    broken = recorded_run(tmp_path / "broken", config="output_dir: x\nlr: [\n")
    no_meta = recorded_run(tmp_path / "no_meta")
    (no_meta / "snapshot" / "meta.yaml").unlink()
    no_snapshot = tmp_path / "no_snapshot"
    (no_snapshot / "checkpoints").mkdir(parents=True)
    # Parsed, but not what was recorded: they were an AttributeError traceback or a misleading "no key" error.
    a_list = recorded_run(tmp_path / "a_list", config="- a\n")
    emptied = recorded_run(tmp_path / "emptied", config="")
    list_meta = recorded_run(tmp_path / "list_meta")
    (list_meta / "snapshot" / "meta.yaml").write_text("- a\n")
    latin1 = recorded_run(tmp_path / "latin1")
    (latin1 / "snapshot" / "config.yaml").write_bytes(b"output_dir: x\nname: caf\xe9\n")
    expected = {
        tmp_path / "nosuch": f"{tmp_path / 'nosuch'}: no such directory; give a run directory (outputs/<experiment>/<time>)",
        a_file: f"{a_file}: not a directory; give a run directory (outputs/<experiment>/<time>)",
        broken: f"{broken / 'snapshot' / 'config.yaml'}:3: the recorded config.yaml is not valid YAML (expected the "
                "node content, but found '<stream end>'); restore it from a copy of the run",
        no_meta: f"{no_meta / 'snapshot' / 'meta.yaml'}: missing, the snapshot is incomplete; restore it from a copy of the run",
        no_snapshot: f"{no_snapshot} has checkpoints but no snapshot/config.yaml: a run's config is recorded only "
                     "there; restore snapshot/ from a copy of the run",
        a_list: f"{a_list / 'snapshot' / 'config.yaml'}: the recorded config.yaml is a list, where Forgather "
                "wrote a mapping; restore it from a copy of the run",
        emptied: f"{emptied / 'snapshot' / 'config.yaml'}: the recorded config.yaml is empty, where Forgather wrote a "
                 "mapping; restore it from a copy of the run",
        list_meta: f"{list_meta / 'snapshot' / 'meta.yaml'}: the recorded meta.yaml is a list, where Forgather wrote a "
                   "mapping; restore it from a copy of the run",
        latin1: f"{latin1 / 'snapshot' / 'config.yaml'}:2: the recorded config.yaml is damaged (bytes that are not "
                "UTF-8); restore it from a copy of the run",
    }
    for run_dir, line in expected.items():
        assert main([flag, str(run_dir), "--cfg"]) == 2
        assert capsys.readouterr().err == f"error: {line}\n"


def test_from_snapshot_with_cfg_prints_where_the_run_would_go_and_makes_no_directory(tmp_path, capsys):
    run_dir = recorded_run(tmp_path / "run")
    assert main(["--outputs", str(tmp_path / "out"), "--from-snapshot", str(run_dir), "--cfg"]) == 0
    assert f"output_dir: {tmp_path / 'out' / 'outputs' / 'micro'}/" in capsys.readouterr().out
    assert main(["--from-snapshot", str(run_dir), "--cfg", f"output_dir={tmp_path / 'elsewhere'}"]) == 0
    assert f"output_dir: {tmp_path / 'elsewhere'}\n" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_ctrl_c_before_training_is_one_word_and_exit_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the data or the tokenizer is prepared (training itself checkpoints first: JobControl)."""
    from forgather.data import tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "build_bpe_tokenizer", interrupted)
    monkeypatch.setenv("FORGATHER_CACHE_DIR", str(tmp_path / "cache"))  # no tokenizer cached from another test
    code, out, err = run(tmp_path, capsys, "max_steps=8")
    assert (code, err) == (130, "interrupted\n")
