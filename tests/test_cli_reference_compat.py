"""The reference Forgather's documented `forgather` command lines, run on a small project: each either does what
the reference's does, or says in one line what to use here instead."""

from __future__ import annotations

import os
import stat

import pytest

from forgather.cli.main import main
from helpers.template_files import write


@pytest.fixture
def project(tmp_path):
    """A reference-style project: meta.yaml, a base template, two configs; a `main` target shared twice."""
    write(tmp_path / "proj", {
        "meta.yaml": "name: Proj\ndescription: a small project\ndefault_config: a.yaml\n",
        "templates/base.yaml": """\
            .define: &item !call:builtins:dict@item { x: 1 }
            main: !call:builtins:list [[*item, *item]]
            """,
        "templates/configs/a.yaml": "-- extends 'base.yaml'\n",
        "templates/configs/b.yaml": "-- extends 'base.yaml'\n",
    })
    return tmp_path / "proj"


def test_ls_takes_several_project_directories(project, tmp_path, capsys):
    write(tmp_path / "other", {"meta.yaml": "name: Other\n", "templates/configs/c.yaml": "main: 1\n"})
    assert main(["ls", str(project), str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert "Proj (" in out and "Other (" in out and "c.yaml" in out


def test_ls_inside_a_project_lists_the_project_it_is_in(project, capsys, monkeypatch):
    monkeypatch.chdir(project / "templates" / "configs")
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.startswith("Proj (../..): a small project")


def test_graph_format_fconfig_writes_a_shared_node_once(project, capsys):
    assert main(["-p", str(project), "graph", "--format", "fconfig"]) == 0
    out = capsys.readouterr().out
    assert "singleton 'item' builtins:dict\n" in out and "singleton 'item' builtins:dict elided ..." in out
    assert out.index(".define:") < out.index("main:")  # keys sorted, as the reference's


def test_trefs_format_svg_draws_the_dot_graph_with_graphviz(project, tmp_path, capsys, monkeypatch):
    fake = tmp_path / "bin" / "dot"
    write(tmp_path / "bin", {"dot": "#!/bin/sh\n[ \"$1\" = -Tsvg ] && echo '<svg>' && grep -c -- '->'\n"})
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "trefs.svg"
    assert main(["-p", str(project), "-t", "a.yaml", "trefs", "--format", "svg", "-o", str(out)]) == 0
    assert out.read_text() == "<svg>\n1\n"  # configs/a.yaml -> base.yaml


def test_trefs_format_svg_without_graphviz_says_what_to_use(project, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["-p", str(project), "trefs", "--format", "svg"]) == 2
    assert "install Graphviz, or print the graph with --format dot" in capsys.readouterr().err


def test_tb_output_dir_is_the_directory_of_runs(project, tmp_path, capsys):
    runs = tmp_path / "output_models" / "m"
    runs.mkdir(parents=True)
    assert main(["-p", str(project), "tb", "--output-dir", str(runs), "--dry-run", "--", "--bind_all"]) == 0
    assert f"--logdir {runs} --port 6006 --bind_all" in capsys.readouterr().out


def test_trefs_format_svg_opens_an_svg_file_in_the_editor(project, tmp_path, monkeypatch):
    write(tmp_path / "bin", {"dot": "#!/bin/sh\necho '<svg>'\n"})
    (tmp_path / "bin" / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    opened = tmp_path / "opened"
    monkeypatch.setenv("EDITOR", f"sh -c 'echo \"$0\" > {opened}'")
    monkeypatch.delenv("VISUAL", raising=False)
    assert main(["-p", str(project), "-t", "a.yaml", "trefs", "--format", "svg", "-e"]) == 0
    assert opened.read_text().strip().endswith("a_trefs.svg")


@pytest.mark.parametrize("argv, instead", [
    (["-t", "a.yaml", "dataset", "--target", "train_dataset_split", "-n", "3"], "construct --target train_dataset"),
    (["model", "--device", "meta", "construct"], "construct --target model"),
    (["ws", "create", "--name", "W", "--description", "d"], "forgather new DIR"),
    (["project", "create", "--name", "P", "--description", "d"], "forgather new DIR"),
    (["checkpoint", "link"], "forgather export RUN_DIR"),
    (["update-vocab", "--add-tokens", "tokens.yaml", "m", "out"], "forgather convert --add-tokens"),
])
def test_a_reference_only_command_says_what_to_use_instead(project, capsys, argv, instead):
    assert main(["-p", str(project), *argv]) == 2
    err = capsys.readouterr().err
    command = next(word for word in argv if word not in ("-t", "a.yaml"))
    assert err.startswith(f"error: forgather {command} is the reference Forgather's command") and err.count("\n") == 1
    assert instead in err


def test_train_with_torchrun_arguments_after_dashes_says_what_to_use(project, capsys):
    assert main(["-p", str(project), "-t", "a.yaml", "train", "--dry-run", "--", "--nproc-per-node", "2"]) == 2
    assert "choose GPUs with -d 0,1" in capsys.readouterr().err


def test_control_list_remote_says_where_to_list_the_jobs(capsys):
    assert main(["control", "list", "--remote", "node1:8947"]) == 2
    assert "ssh node1 forgather control list" in capsys.readouterr().err
