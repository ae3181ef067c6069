"""dynamic_args: a config declares its own command-line arguments; `forgather pp/train ...` parse them and the
template sees their values (an argument not given leaves the template's default)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from forgather.cli.main import main

CONFIG = """\
steps: {{ max_steps | default(5) }}
abridged: {{ abridged | default('unset') }}
data: "{{ dataset_proj | default('none') }}"
dynamic_args: !dlist
    max_steps:
        names: [ "--max-steps", "-n" ]
        type: "int"
        default: 100
        help: "How many steps"
    abridged:
        names: "--abridged"
        action: "store_true"
    dataset_proj:
        names: "--dataset-proj"
        type: "path"
    dropped: ~
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("default_config: dyn.yaml\n")
    (tmp_path / "templates" / "configs" / "dyn.yaml").write_text(CONFIG)
    return tmp_path


def pp(project: Path, capsys, *args: str) -> list[str]:
    assert main(["-p", str(project), "pp", *args]) == 0
    return capsys.readouterr().out.splitlines()[:3]


def test_declared_arguments_reach_the_template(project, capsys, monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert pp(project, capsys, "--max-steps", "7", "--dataset-proj", "~/data") == ["steps: 7", "abridged: False", 'data: "/home/someone/data"']
    assert pp(project, capsys, "-n", "3", "--abridged") == ["steps: 3", "abridged: True", 'data: "none"']


def test_an_argument_not_given_leaves_the_template_default(project, capsys):
    # The declared `default: 100` is not used (as in the reference): the template's default(5) applies.
    assert pp(project, capsys) == ["steps: 5", "abridged: unset", 'data: "none"']


def test_a_bad_value_is_argparse_error_naming_the_argument(project, capsys):
    with pytest.raises(SystemExit):
        main(["-p", str(project), "pp", "--max-steps", "many"])
    assert "argument --max-steps/-n: invalid int value: 'many'" in capsys.readouterr().err


def test_help_lists_the_config_arguments(project, capsys):
    with pytest.raises(SystemExit):
        main(["-p", str(project), "pp", "--help"])
    out = capsys.readouterr().out
    assert "arguments of configs/dyn.yaml (dynamic_args)" in out and "How many steps" in out and "--abridged" in out


def test_no_dyn_ignores_the_declarations(project, capsys):
    with pytest.raises(SystemExit):
        main(["-p", str(project), "--no-dyn", "pp", "--abridged"])
    assert "unrecognized arguments: --abridged" in capsys.readouterr().err


def test_an_unknown_type_name_is_an_error_at_the_declaration(project, capsys):
    config = project / "templates" / "configs" / "dyn.yaml"
    config.write_text(CONFIG.replace('type: "int"', 'type: "integer"'))
    assert main(["-p", str(project), "pp", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{config}:4:" in err and "unknown type 'integer'; use one of int, str, float, bool, path" in err


def test_train_passes_the_values_to_the_runner(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert main(["train", "--max-steps", "9", "--cfg"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["steps: 9", "abridged: false"]


def test_the_runner_takes_values_as_json(project, capsys):
    from forgather.run import main as run

    assert run(["-p", str(project), "--dynamic-args", '{"max_steps": 11}', "--cfg", "+experiment=dyn"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "steps: 11"


def test_the_declarations_are_read_from_a_plain_list_too(tmp_path, capsys):
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("default_config: a.yaml\n")
    (tmp_path / "templates" / "configs" / "a.yaml").write_text(textwrap.dedent("""\
        lr: {{ lr | default(0.1) }}
        dynamic_args:
            - names: "--lr"
              type: "float"
        """))
    assert main(["-p", str(tmp_path), "pp", "--lr", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("lr: 0.5\n")
