"""The commands that print a config's stages, as a user hits them: a reader that closes the pipe, an option
given wrongly, a config that fails at its last step; each a one-line error naming where and what to do."""

from __future__ import annotations

import os
import subprocess
import sys

from forgather.cli.main import main
from helpers.template_files import write


def project(tmp_path, config: str) -> str:
    write(tmp_path / "p", {"meta.yaml": "name: p\n", "templates/configs/c.yaml": config})
    return str(tmp_path / "p")


def test_construct_read_by_a_closed_pipe_ends_quietly_with_success(tmp_path):
    """`forgather construct | head -1`: rich's console ended the process with 1 when the reader had gone
    (a `set -o pipefail` pipeline failed), where every other printing command ends with 0."""
    root = project(tmp_path, "a: !call:builtins:dict {x: 1}\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "forgather", "-p", root, "-t", "c.yaml", "construct"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_construct_call_of_an_object_that_is_not_callable_is_one_line(tmp_path, capsys):
    """--call on a target that built an int printed a traceback of construct.py."""
    root = project(tmp_path, "a: 1\nn: !call:builtins:dict {x: 1}\n")
    assert main(["-p", root, "-t", "c.yaml", "construct", "--target", "n", "--call"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: {root}/templates/configs/c.yaml:2: --call: n built a dict, which is not callable")


def test_construct_call_that_raises_names_the_target_and_its_line(tmp_path, capsys):
    root = project(tmp_path, "a: 1\np: !partial:builtins:sorted {reverse: true}\n")
    assert main(["-p", root, "-t", "c.yaml", "construct", "--target", "p", "--call"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: {root}/templates/configs/c.yaml:2: --call: calling p raised TypeError: ")


def test_construct_call_still_prints_what_the_call_returns(tmp_path, capsys):
    root = project(tmp_path, "main: !partial:builtins:int ['12']\n")
    assert main(["-p", root, "-t", "c.yaml", "construct", "--call"]) == 0
    assert capsys.readouterr().out == "12\n"


def test_config_resolve_of_a_variable_without_a_value_names_its_line(tmp_path, capsys):
    """`config --resolve` with a !var that has no default printed OmegaConf's three-line message, without
    the template line; `config` without --resolve prints it as ${need}."""
    root = project(tmp_path, "a: 1\nb: !call:builtins:str [!var need]\n")
    assert main(["-p", root, "-t", "c.yaml", "config"]) == 0
    assert "${need}" in capsys.readouterr().out
    assert main(["-p", root, "-t", "c.yaml", "config", "--resolve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MissingMandatoryValue" not in err
    assert err.startswith(f"error: {root}/templates/configs/c.yaml:2: --resolve: b._args_[0]: no value given for 'need';")
    assert "default" in err


def test_output_file_named_empty_is_refused_not_printed(tmp_path, capsys):
    """`-o "$OUT"` with OUT unset printed the YAML to the terminal and wrote nothing, as if -o were not given."""
    root = project(tmp_path, "a: 1\n")
    assert main(["-p", root, "-t", "c.yaml", "pp", "-o", ""]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: -o '': no file named;")


def test_output_file_that_is_a_symlink_is_written_through_it(tmp_path, capsys):
    """-o on a symlink (a dotfile kept in a repository) replaced the link by a file and left its target stale,
    where the shell's `>` writes the target."""
    root = project(tmp_path, "a: 1\n")
    target = tmp_path / "kept" / "c.yaml"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "c.yaml"
    link.symlink_to(target)
    assert main(["-p", root, "-t", "c.yaml", "pp", "-o", str(link)]) == 0
    assert link.is_symlink() and target.read_text() == "a: 1\n"


def test_output_file_written_again_keeps_its_permissions(tmp_path, capsys):
    """A file the user made private (0600) came back readable by everyone (0644) after -o wrote it again."""
    root = project(tmp_path, "a: 1\n")
    out = tmp_path / "c.yaml"
    out.write_text("old\n")
    out.chmod(0o600)
    assert main(["-p", root, "-t", "c.yaml", "pp", "-o", str(out)]) == 0
    assert out.read_text() == "a: 1\n" and out.stat().st_mode & 0o777 == 0o600


def test_a_missing_name_in_a_model_src_file_names_the_file_not_its_module(tmp_path, capsys):
    """`.mod:g` where model_src/mod.py has no g named the module forgather loaded it as ('forgather_local.mod_…')."""
    root = project(tmp_path, "a: !call:.mod:g []\n")
    write(tmp_path / "p", {"model_src/mod.py": "def f():\n    return 1\n"})
    assert main(["-p", root, "-t", "c.yaml", "construct"]) == 2
    err = capsys.readouterr().err
    assert f"'{root}/model_src/mod.py' has no attribute 'g'" in err and "forgather_local" not in err


def test_graph_prints_text_as_written_not_escaped(tmp_path, capsys):
    root = project(tmp_path, 'b: "héllo ✓"\n')
    assert main(["-p", root, "-t", "c.yaml", "graph"]) == 0
    assert "b: héllo ✓" in capsys.readouterr().out


def test_a_config_file_outside_the_projects_templates_says_so_and_template_path_takes_it(tmp_path, capsys):
    """`-t /elsewhere/templates/configs/c.yaml` was looked up as `configs//elsewhere/...` and not found."""
    root = project(tmp_path, "a: 1\n")
    write(tmp_path / "elsewhere", {"templates/configs/x.yaml": "b: 2\n"})
    outside = str(tmp_path / "elsewhere" / "templates" / "configs" / "x.yaml")
    assert main(["-p", root, "-t", outside, "pp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -t {outside}: this file lies outside the project's template directories")
    assert main(["-p", root, "--template-path", str(tmp_path / "elsewhere" / "templates"), "-t", outside, "pp"]) == 0
    assert capsys.readouterr().out == "b: 2\n"


def test_an_error_raised_in_the_users_code_names_its_file_and_line(tmp_path, capsys):
    """The node and its config line were named, but not where in the user's model code the error came from."""
    root = project(tmp_path, "a: !call:.thing:Thing [3]\nb: !call:builtins:int [x]\n")
    write(tmp_path / "p", {"model_src/thing.py": "def helper(x):\n    raise ValueError(f'bad x {x}')\n\n\n"
                                                  "class Thing:\n    def __init__(self, x):\n        helper(x)\n"})
    assert main(["-p", root, "-t", "c.yaml", "construct", "--target", "a"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(
        f"raised ValueError: bad x 3 (at {root}/model_src/thing.py:2 in helper)")
    assert main(["-p", root, "-t", "c.yaml", "construct", "--target", "b"]) == 2  # raised by Python itself
    assert capsys.readouterr().err.rstrip().endswith("raised ValueError: invalid literal for int() with base 10: 'x'")
