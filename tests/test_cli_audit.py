"""The project-browsing commands (new, ls, index, meta, tlist, tb, completion) on the mistakes a user makes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from forgather.cli import new
from forgather.cli.completion import candidates
from forgather.cli.main import main
from forgather.errors import STRICT_ENV
from forgather.project import Project
from forgather.template import TemplateWarning


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def project(root: Path, meta: str) -> str:
    write(root, {"meta.yaml": meta, "templates/configs/a.yaml": "## A\nmain: 1\n",
                 "templates/configs/b.yaml": "## B\nmain: 2\n"})
    return str(root)


# -- forgather new ------------------------------------------------------------------------------------------


def test_new_refuses_a_directory_inside_the_project_it_copies(tmp_path, capsys):
    source = new.create_project(tmp_path / "src")
    write(tmp_path / "src", {"experiments/notes.txt": "mine"})  # copying it would copy the copy, without end
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "src").rglob("*"))
    assert main(["new", str(tmp_path / "src" / "experiments" / "v2"), "--from", source.root]) == 2
    assert "inside" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "src").rglob("*")) == before


def test_new_names_a_project_after_a_directory_holding_template_delimiters(tmp_path):
    for name in ("{{x}}", "a{#b", "{% raw %}{%c"):
        created = new.create_project(tmp_path / name)
        assert Project.load(created.root).name == name


# -- forgather ls / index / meta -----------------------------------------------------------------------------


def test_ls_recursive_does_not_list_run_snapshots_as_projects(tmp_path, capsys):
    root = project(tmp_path / "p", "name: p\n")
    write(Path(root), {f"outputs/a/2026-01-01_00-00-0{i}/snapshot/{file}": "experiment: a\n"
                       for i in range(3) for file in ("meta.yaml", "config.yaml", "command.txt")})
    assert main(["ls", "-r", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "snapshot" not in out and out.startswith("p (")


def test_a_recursive_search_does_not_walk_a_projects_runs(tmp_path):
    """A project's outputs/ and multirun/ hold runs (thousands, on a long-lived project), never projects."""
    from forgather.project import project_dirs

    root = project(tmp_path / "p", "name: p\n")
    write(Path(root), {"outputs/x/meta.yaml": "name: x\n", "multirun/y/meta.yaml": "name: y\n",
                       "sub/meta.yaml": "name: sub\n"})
    assert project_dirs(str(tmp_path), recursive=True) == [root, f"{root}/sub"]


def test_a_default_config_named_without_its_suffix_is_marked_default(tmp_path, capsys):
    root = project(tmp_path / "p", "name: p\ndefault_config: b\n")
    assert main(["-p", root, "ls"]) == 0
    assert "* b.yaml" in capsys.readouterr().out
    assert main(["-p", root, "index"]) == 0
    assert "B (default)" in capsys.readouterr().out


def test_a_misspelled_meta_key_is_named_with_the_close_key(tmp_path, monkeypatch):
    root = project(tmp_path / "p", "name: p\ndefault_confg: b.yaml\n")
    for command in ("ls", "index", "meta", "pp"):
        with pytest.warns(TemplateWarning, match=r"unknown key 'default_confg', not read; did you mean 'default_config'") as caught:
            assert main(["-p", root, command]) == 0
        assert (caught[0].filename, caught[0].lineno) == (f"{root}/meta.yaml", 2)
    monkeypatch.setenv(STRICT_ENV, "1")
    assert main(["-p", root, "pp"]) == 2


def test_the_reference_forgathers_own_meta_keys_are_not_warned_about(tmp_path, capsys):
    root = project(tmp_path / "p", "name: p\nmodels_dir: models\nforgather_dir: /opt/fg\noutput_dir: out\n")
    assert main(["-p", root, "index"]) == 0
    assert capsys.readouterr().err == ""


def test_a_default_config_that_is_no_config_is_named_with_the_close_ones(tmp_path, capsys):
    root = project(tmp_path / "p", "name: p\ndefault_config: c.yaml\n")
    assert main(["-p", root, "index"]) == 0
    err = capsys.readouterr().err
    assert "meta.yaml:2: default_config 'c.yaml' is not a config of the project" in err and "'a.yaml'" in err


# -- forgather tlist -----------------------------------------------------------------------------------------


def test_tlist_names_a_template_file_it_cannot_read_instead_of_hiding_it(tmp_path, capsys):
    root = project(tmp_path / "p", "name: p\n")
    (tmp_path / "p/templates/configs/latin1.yaml").write_bytes(b"## caf\xe9\nmain: 3\n")
    write(tmp_path / "p", {"templates/split.yaml": "a: 1\n#---- s ----\nb: 2\n#---- s ----\nc: 3\n"})
    assert main(["-p", root, "tlist"]) == 0
    captured = capsys.readouterr()
    assert "configs/a.yaml" in captured.out
    assert "latin1.yaml:1: not listed: not UTF-8 text" in captured.err
    assert "split.yaml:4: not listed: sub-template 's' is named twice" in captured.err


# -- forgather tb --------------------------------------------------------------------------------------------


def test_tb_on_an_address_this_machine_does_not_have_is_one_line(tmp_path, capsys):
    root = project(tmp_path / "p", "name: p\n")
    assert main(["-p", root, "tb", "--host", "192.0.2.1", "--port", "0"]) == 2  # TEST-NET-1: never local
    err = capsys.readouterr().err
    assert "--host 192.0.2.1" in err and "Traceback" not in err


def test_tb_on_a_host_name_that_does_not_resolve_is_one_line(tmp_path, capsys, monkeypatch):
    def unresolved(address, **options):  # what socket.create_server raises for it, without asking a DNS server
        raise OSError(socket.EAI_NONAME, f"Name or service not known (while attempting to bind on address {address})")

    monkeypatch.setattr(socket, "create_server", unresolved)
    root = project(tmp_path / "p", "name: p\n")
    assert main(["-p", root, "tb", "--host", "no.such.host.invalid"]) == 2
    assert "--host no.such.host.invalid: Name or service not known" in capsys.readouterr().err


# -- forgather completion ------------------------------------------------------------------------------------


def test_completion_offers_a_positionals_choices():
    assert candidates("forgather completion ") == ["bash", "zsh"]
    assert candidates("forgather completion z") == ["zsh"]


def test_completion_offers_the_values_of_an_option_written_with_equals():
    assert candidates("forgather trefs --format=t") == ["--format=tree"]
    assert candidates("forgather tlist --format=") == ["--format=files", "--format=md", "--format=names"]
