"""The `forgather` command on the composition example: every stage printable, imports kept light."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from forgather.cli.main import main
from forgather.graph import load_graph
from forgather.project import Project

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "project_composition")


def cli(capsys, *argv: str) -> str:
    assert main(["-p", EXAMPLE, *argv]) == 0
    return capsys.readouterr().out


def test_pp_prints_the_rendered_yaml_of_each_experiment(capsys):
    base = load_graph(cli(capsys, "-t", "base.yaml", "pp"))
    assert set(base.nodes) == {".define", "model", "optimizer"}
    assert "torch.optim:SGD" in cli(capsys, "-t", "sgd", "pp")
    assert "Linear [128, 128]" in cli(capsys, "-t", "wide.yaml", "pp")


def test_pp_output_ends_in_one_newline_though_rendering_drops_it(tmp_path, capsys):
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: p\n")
    (tmp_path / "templates" / "configs" / "c.yaml").write_text("a: 1\n")  # rendered as 'a: 1', no newline
    assert main(["-p", str(tmp_path), "-t", "c.yaml", "pp"]) == 0
    assert capsys.readouterr().out == "a: 1\n"


def test_pp_jinja_shows_the_expanded_line_syntax(capsys):
    out = cli(capsys, "-t", "sgd.yaml", "pp", "--jinja")
    assert "{% extends 'configs/base.yaml' %}" in out and "{% block optimizer %}" in out


def test_a_reader_that_closes_the_pipe_ends_a_printing_command_quietly():
    """`forgather pp | head -5`: the reader may close the pipe before pp has written; pp then ends with success
    (a `set -o pipefail` pipeline does not fail) and no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: that write fails with EPIPE, every time
    try:
        result = subprocess.run([sys.executable, "-m", "forgather", "-p", EXAMPLE, "-t", "sgd.yaml", "pp", "--jinja"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_targets_lists_non_dot_keys(capsys):
    assert cli(capsys, "-t", "base.yaml", "targets").split() == ["model", "optimizer"]


def test_graph_yaml_and_python_formats(capsys, tmp_path):
    assert "!partial:torch.optim:AdamW@optimizer_factory" in cli(capsys, "-t", "base.yaml", "graph")
    assert "def construct(lr=0.001):" in cli(capsys, "-t", "base.yaml", "graph", "--format", "python")
    assert "CallNode(kind='partial', target='torch.optim:AdamW'" in cli(capsys, "-t", "base.yaml", "graph", "--format", "repr")
    assert cli(capsys, "-t", "base.yaml", "graph", "--format", "none") == ""
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: p\n")
    (tmp_path / "templates" / "configs" / "c.yaml").write_text("a: !call:math:sqrt [4]\nb: !nosuchtag 1\n")
    assert main(["-p", str(tmp_path), "-t", "c.yaml", "graph", "--format", "none"]) == 2  # still checked
    assert "c.yaml" in capsys.readouterr().err


def test_config_prints_hydra_vocabulary(capsys):
    config = yaml.safe_load(cli(capsys, "-t", "base.yaml", "config"))
    assert config["optimizer"]["optimizer_factory"]["_partial_"] is True
    assert config["optimizer"]["model"] == "${model}" and config["lr"] == 0.001


def test_construct_builds_an_optimizer_over_the_models_parameters():
    loaded = Project.load(EXAMPLE).load_config("sgd.yaml")
    built = loaded.construct()
    optimizer, model = built["optimizer"], built["model"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("config", ["base.yaml", "wide.yaml", "sgd.yaml"])
def test_generated_code_runs_and_builds_the_same_objects(config):
    loaded = Project.load(EXAMPLE).load_config(config)
    namespace: dict = {}
    exec(compile(loaded.code("optimizer"), "<generated>", "exec"), namespace)
    generated = namespace["construct"]()
    constructed = loaded.construct("optimizer")
    assert type(generated) is type(constructed) and generated.defaults == constructed.defaults
    assert [p.shape for p in generated.param_groups[0]["params"]] == [p.shape for p in constructed.param_groups[0]["params"]]


def test_construct_command_with_call(capsys, tmp_path):
    out = cli(capsys, "-t", "base.yaml", "construct", "--target", "model")
    assert "Sequential" in out and "Linear(in_features=8, out_features=32" in out


def test_ls_and_index(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "forgather", "ls", "-r", os.path.join(REPO, "examples")], capture_output=True, text=True, check=True
    ).stdout
    assert "Project composition" in out and "sgd.yaml" in out and "SGD with momentum" in out
    out = cli(capsys, "index")
    assert "(default)" in out and os.path.join(REPO, "conf") in out


def test_user_error_is_one_located_line_on_stderr(tmp_path):
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: broken\n")
    (tmp_path / "templates" / "configs" / "c.yaml").write_text("a: 1\nb: {{ nope }}\n")
    result = subprocess.run([sys.executable, "-m", "forgather", "-p", str(tmp_path), "-t", "c", "pp"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path}/templates/configs/c.yaml:2: undefined variable" in result.stderr


RUNNER_PROJECT = os.path.join(REPO, "tests", "fixtures", "runner_project")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["-p", EXAMPLE, "-t", "sgd.yaml", "pp"],
        ["train", "--help"],
        ["completion", "--line", f"forgather -p {RUNNER_PROJECT} -t micro.yaml train optimizer.l"],
    ],
)
def test_help_pp_and_completion_do_not_import_torch_or_lightning(argv):
    probe = (
        "import sys, contextlib, io\n"
        "from forgather.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_is_the_runner_for_a_project_config(capsys):
    assert main(["-p", RUNNER_PROJECT, "-t", "micro.yaml", "train", "--dry-run", "-d", "0,1", "lr=1e-3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("CUDA_VISIBLE_DEVICES=0,1 ") and out.endswith(f"-m forgather.run -p {RUNNER_PROJECT} --outputs {RUNNER_PROJECT} +experiment=micro -d 0,1 lr=1e-3")
    assert main(["-p", RUNNER_PROJECT, "-t", "micro.yaml", "train", "--cfg", "max_steps=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_steps"] == 3


def test_tb_serves_the_projects_runs_on_loopback(capsys, tmp_path):
    (tmp_path / "outputs").mkdir()
    assert main(["-p", str(tmp_path), "tb", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-m tensorboard.main" in out and str(tmp_path / "outputs") in out and "--host 127.0.0.1" in out


def test_dash_i_starts_the_shell_over_the_project():
    result = subprocess.run(
        [sys.executable, "-m", "forgather", "-p", EXAMPLE, "-i"], input="targets sgd.yaml\nquit\n", capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "model\noptimizer" in result.stdout


def test_a_misspelled_option_is_named_with_the_close_one_by_both_commands(capsys):
    from forgather.run import main as run_main

    with pytest.raises(SystemExit) as exited:
        main(["-p", EXAMPLE, "-t", "base.yaml", "construct", "--targett", "model"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --targett model (--targett: did you mean --target?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        run_main(["+experiment=tiny_llama", "--cfgg"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --cfgg (--cfgg: did you mean --cfg?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-p", EXAMPLE, "-t", "base.yaml", "pp", "--zzzzzz"])
    assert capsys.readouterr().err.rstrip().endswith("unrecognized arguments: --zzzzzz")


def test_a_project_directory_that_does_not_exist_is_named(tmp_path, capsys):
    assert main(["-p", str(tmp_path / "projetc"), "ls"]) != 0
    assert f"-p {tmp_path / 'projetc'}: no such directory" in capsys.readouterr().err


def test_forgathers_options_may_follow_the_command_as_the_reference_takes_them(capsys, tmp_path):
    """`forgather pp -t a.yaml` as well as `forgather -t a.yaml pp` (the reference Forgather parses its options
    anywhere on the line), with its long names too; argparse had called -t after the command unrecognized."""
    before = cli(capsys, "-t", "sgd.yaml", "pp")
    assert main(["pp", "-p", EXAMPLE, "-t", "sgd.yaml"]) == 0
    assert capsys.readouterr().out == before
    assert main(["pp", "--project-dir", EXAMPLE, "--config-template", "sgd.yaml"]) == 0
    assert capsys.readouterr().out == before
    assert main(["-p", EXAMPLE, "-t", "wide.yaml", "pp", "-t", "sgd.yaml"]) == 0  # the later one, as argparse's
    assert capsys.readouterr().out == before
    # a repeatable option given on both sides keeps both
    for name in ("a", "b"):
        (tmp_path / name / "extra").mkdir(parents=True)
        (tmp_path / name / "extra" / f"from_{name}.yaml").write_text("x: 1\n")
    assert main(["-p", EXAMPLE, "--template-path", str(tmp_path / "a"), "tlist", "--template-path", str(tmp_path / "b")]) == 0
    listed = capsys.readouterr().out
    assert "extra/from_a.yaml" in listed and "extra/from_b.yaml" in listed
    # train: the runner's own --strict and forgather's options after the command
    assert main(["train", "-p", RUNNER_PROJECT, "-t", "micro.yaml", "--dry-run", "--strict"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-m forgather.run -p {RUNNER_PROJECT} --outputs {RUNNER_PROJECT} +experiment=micro --strict")


def test_an_option_is_never_suggested_as_its_own_correction():
    """argparse's leftover `-t` (an option of another parser) once read '-t: did you mean -t?'."""
    import argparse

    from forgather.errors import unrecognized

    parser = argparse.ArgumentParser()
    parser.add_argument("-t", "--target")
    assert unrecognized(["-t", "x", "--targte"], [parser]) == "unrecognized arguments: -t x --targte (--targte: did you mean --target?)"


def test_output_goes_to_a_file_whole_or_to_an_editor_as_the_references_o_and_e(capsys, tmp_path, monkeypatch):
    printed = cli(capsys, "-t", "sgd.yaml", "pp")
    target = tmp_path / "out" / "sgd.yaml"
    assert main(["-p", EXAMPLE, "-t", "sgd.yaml", "pp", "-o", str(target)]) == 0
    assert target.read_text() == printed and capsys.readouterr().out == ""
    # a command that fails leaves the file as it was, and no temporary file beside it
    assert main(["-p", EXAMPLE, "-t", "nosuch.yaml", "pp", "-o", str(target)]) == 2
    assert target.read_text() == printed and [p.name for p in target.parent.iterdir()] == ["sgd.yaml"]
    # -e: the editor gets a file named after the config and the command
    seen = tmp_path / "seen"
    seen.mkdir()
    copy_into_seen = f"import shutil, sys; shutil.copy(sys.argv[2], sys.argv[1])"  # argv: the editor's, then FILE
    monkeypatch.setenv("VISUAL", f"{sys.executable} -c '{copy_into_seen}' {seen}")
    monkeypatch.setenv("EDITOR", "unused")
    assert main(["-p", EXAMPLE, "-t", "sgd.yaml", "code", "-e"]) == 0
    (opened,) = seen.iterdir()
    assert opened.name == "sgd_code.py" and opened.read_text().startswith('"""Generated by Forgather')


@pytest.mark.parametrize("argv", [["control", "abort", "--help"], ["convert", "--help"], ["pp", "-t", "sgd.yaml", "--help"]])
def test_a_commands_help_is_help_though_its_positionals_are_missing(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(["-p", EXAMPLE, *argv])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith(f"usage: forgather {argv[0]}")


def test_pp_and_graph_debug_show_each_loaded_template_numbered_also_when_rendering_fails(capsys, tmp_path):
    out = cli(capsys, "-t", "sgd.yaml", "pp", "-d")
    banners = [line.strip("- ") for line in out.splitlines() if line.startswith("---")]
    assert banners[:2] == ["configs/sgd.yaml", "sgd.optimizer"] and "configs/base.yaml" in banners
    assert "    2  {% extends 'configs/base.yaml' %}" in out  # the line syntax expanded, numbered
    assert out.endswith(cli(capsys, "-t", "sgd.yaml", "pp"))  # then the YAML, as without -d
    assert "-- configs/sgd.yaml --" in cli(capsys, "-t", "sgd.yaml", "graph", "-d")
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: p\n")
    (tmp_path / "templates" / "configs" / "bad.yaml").write_text("-- set x = 1\na: {{ nope.attr }}\n")
    assert main(["-p", str(tmp_path), "-t", "bad.yaml", "pp", "-d"]) == 2
    captured = capsys.readouterr()
    assert "    1  {% set x = 1 %}" in captured.out and captured.err.count("\n") == 1 and "bad.yaml:2" in captured.err


def test_ls_debug_renders_every_config_and_names_the_failing_ones(capsys, tmp_path):
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: p\n")
    (tmp_path / "templates" / "configs" / "good.yaml").write_text("a: 1\n")
    (tmp_path / "templates" / "configs" / "bad.yaml").write_text("a: {{ nope.attr }}\n")
    assert main(["-p", str(tmp_path), "ls"]) == 0  # without -d the configs are not rendered
    capsys.readouterr()
    assert main(["-p", str(tmp_path), "ls", "-d"]) == 2
    lines = capsys.readouterr().out.splitlines()
    bad = next(i for i, line in enumerate(lines) if "bad.yaml" in line)
    assert lines[bad + 1].strip().startswith("error: ") and "bad.yaml:1" in lines[bad + 1]
    assert not any("error" in line for line in lines[bad + 2:])


def test_tb_passes_the_words_after_dashes_to_tensorboard(capsys, tmp_path):
    (tmp_path / "outputs").mkdir()
    assert main(["-p", str(tmp_path), "tb", "--all", "--dry-run", "--", "--samples_per_plugin", "images=9"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("--host 127.0.0.1 --port 6006 --samples_per_plugin images=9")
    assert main(["-p", str(tmp_path), "tb", "--dry-run", "--", "--bind_all"]) == 0  # every interface, asked for
    out = capsys.readouterr().out
    assert "--host" not in out and out.rstrip().endswith("--port 6006 --bind_all")


def test_trefs_as_markdown_and_graphviz(capsys):
    md = cli(capsys, "-t", "sgd.yaml", "trefs", "--format", "md").splitlines()
    sgd = os.path.relpath(os.path.join(EXAMPLE, "templates", "configs", "sgd.yaml"))  # links from where we stand
    assert md[0] == f"- [configs/sgd.yaml]({sgd}) (line 1)"
    assert f"  - [sgd.optimizer]({sgd}) (line 8)" in md
    dot = cli(capsys, "-t", "sgd.yaml", "trefs", "--format", "dot")
    assert dot.startswith("digraph trefs {") and dot.rstrip().endswith("}")
    edges = {line.strip().rstrip(";") for line in dot.splitlines() if "->" in line}
    assert edges == {'"configs/sgd.yaml" -> "configs/base.yaml"', '"configs/sgd.yaml" -> "sgd.optimizer"',
                     '"configs/base.yaml" -> "project.yaml"', '"project.yaml" -> "optimizer.yaml"',
                     '"sgd.optimizer" -> "optimizer.yaml"'}
