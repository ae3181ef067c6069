"""Bad templates and command lines, each one located line on stderr: a self-cycle, a sub-template named twice,
a file that is not UTF-8, `-- extends 5`, a bracketed line that is no block header, `-o` at a directory, and a
config given as the path of its file."""

from __future__ import annotations

import pytest

from forgather.cli.main import main
from forgather.project import Project
from forgather.template import TemplateEnvironment, TemplateError
from helpers.template_files import render_error, write


def project(tmp_path, configs: dict[str, str | bytes]) -> str:
    write(tmp_path, {"meta.yaml": "name: p\n", **{f"templates/configs/{n}": t for n, t in configs.items()}})
    return str(tmp_path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


# -- include/extends cycles ------------------------------------------------------------------------------------

def test_a_template_extending_itself_is_a_cycle_at_its_line(tmp_path):
    error = render_error(tmp_path, {"a.yaml": "x: 1\n-- extends 'a.yaml'\n"}, "a.yaml")
    assert error.location == (str(tmp_path / "a.yaml"), 2)
    assert error.message.startswith("include/extends cycle (a.yaml -> a.yaml)") and "break the cycle" in error.message
    assert "RecursionError" not in str(error)


def test_a_template_including_itself_is_a_cycle_named_with_the_chain_that_led_there(tmp_path):
    files = {"top.yaml": "t: 1\n-- include 'self.yaml'\n", "self.yaml": "a: 1\n-- include 'self.yaml'\n"}
    error = render_error(tmp_path, files, "top.yaml")
    assert error.location == (str(tmp_path / "self.yaml"), 2)
    assert error.chain == [(str(tmp_path / "top.yaml"), 2), (str(tmp_path / "self.yaml"), 2)]
    assert "include/extends cycle (self.yaml -> self.yaml)" in error.message


def test_a_two_template_cycle_is_still_named_through_both(tmp_path):
    files = {"a.yaml": "-- extends 'b.yaml'\n", "b.yaml": "-- extends 'a.yaml'\n"}
    error = render_error(tmp_path, files, "a.yaml")
    assert "include/extends cycle (a.yaml -> b.yaml -> a.yaml)" in error.message


# -- split files, encodings, template names --------------------------------------------------------------------

def test_a_sub_template_named_twice_is_an_error_naming_both_lines(tmp_path):
    text = "a: 1\n#---- sub.x ----\nb: 2\n#---- sub.x ----\nc: 3\n"
    error = render_error(tmp_path, {"t.yaml": text}, "t.yaml")
    assert error.location == (str(tmp_path / "t.yaml"), 4)
    assert "sub-template 'sub.x' is named twice, at lines 2 and 4; rename one of them" in error.message


def test_distinct_sub_templates_still_load(tmp_path):
    write(tmp_path, {"t.yaml": "-- include 'sub.y'\n#---- sub.x ----\nb: 2\n#---- sub.y ----\nc: 3\n"})
    assert TemplateEnvironment([str(tmp_path)]).render("t.yaml") == "c: 3"


def test_a_template_that_is_not_utf8_names_its_file_the_line_of_the_byte_and_the_fix(tmp_path):
    error = render_error(tmp_path, {"t.yaml": b"a: 1\nb: 2\nc: \xff caf\xe9\n"}, "t.yaml")
    assert error.location == (str(tmp_path / "t.yaml"), 3)
    assert "not UTF-8 text (byte 0xff); save it as UTF-8" in error.message


def test_a_meta_yaml_that_is_not_utf8_is_located_in_meta_yaml(tmp_path):
    write(tmp_path, {"meta.yaml": b"name: caf\xe9\n"})
    with pytest.raises(TemplateError) as caught:
        Project.load(str(tmp_path))
    assert caught.value.location == (str(tmp_path / "meta.yaml"), 1)
    assert "save it as UTF-8" in caught.value.message


@pytest.mark.parametrize("tag", ["extends", "include", "import", "from"])
@pytest.mark.parametrize("value, shown", [("5", "5 (int)"), ("none", "None (NoneType)")])
def test_extends_of_something_other_than_a_name_says_it_takes_a_name(tmp_path, tag, value, shown):
    statement = {"import": f"import {value} as m", "from": f"from {value} import m"}.get(tag, f"{tag} {value}")
    error = render_error(tmp_path, {"t.yaml": f"## x\n-- {statement}\n"}, "t.yaml")
    assert error.location == (str(tmp_path / "t.yaml"), 2)
    assert error.message == (f"extends, include and import take a template name (a string), not {shown}; "
                             "quote it: -- extends 'name.yaml'")


# -- a bracketed line that is no block header --------------------------------------------------------------

@pytest.mark.parametrize("header", ["[a-b]", "[]", "    [mo del]"])
def test_a_bracketed_line_that_is_no_block_header_is_named_where_yaml_fails(tmp_path, header):
    root = project(tmp_path, {"c.yaml": f"a:\n    x: 1\n{header}\nb: 2\n"})
    with pytest.raises(TemplateError) as caught:
        Project.load(root).load_config("c.yaml").graph
    assert caught.value.location == (str(tmp_path / "templates/configs/c.yaml"), 3)
    assert caught.value.message == (f"{header.strip()} is not a block header: a block name is letters, digits and _ "
                                    "([name], or [name!] to trim it); YAML read the line as a list")


@pytest.mark.parametrize("text, targets", [("a:\n    [x-y]\nb: [1]\n", {"a", "b"}), ("c:\n    []\n", {"c"})])
def test_a_flow_list_on_its_own_line_is_still_yaml(tmp_path, text, targets):
    root = project(tmp_path, {"c.yaml": text})
    assert set(Project.load(root).load_config("c.yaml").graph.targets) == targets


# -- the command line --------------------------------------------------------------------------------------

def test_output_to_an_existing_directory_names_it_and_a_file_to_give(tmp_path, capsys):
    root = project(tmp_path, {"ok.yaml": "a: 1\n"})
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["-p", root, "-t", "ok.yaml", "pp", "-o", str(folder)]) == 2
    assert one_error_line(capsys) == f"error: -o {folder}: is a directory; give a file to write, e.g. -o {folder / 'pp.yaml'}"
    assert list(folder.iterdir()) == []


def test_output_through_a_file_names_that_file(tmp_path, capsys):
    root = project(tmp_path, {"ok.yaml": "a: 1\n"})
    blocking = tmp_path / "meta.yaml"
    assert main(["-p", root, "-t", "ok.yaml", "pp", "-o", str(blocking / "x" / "out.yaml")]) == 2
    assert one_error_line(capsys) == (f"error: -o {blocking / 'x' / 'out.yaml'}: {blocking} is a file, not a directory; "
                                      "give a path whose folders are directories (or new)")


def test_a_misspelled_option_suggests_an_option_once(tmp_path, capsys):
    root = project(tmp_path, {"ok.yaml": "a: 1\n"})
    with pytest.raises(SystemExit):
        main(["-p", root, "-t", "ok.yaml", "pp", "--tmplate", "x"])
    assert "(--tmplate: did you mean --template-path?)" in capsys.readouterr().err


def test_a_config_may_be_given_as_the_path_of_its_file(tmp_path, capsys, monkeypatch):
    root = project(tmp_path, {"ok.yaml": "a: 1\n"})
    loaded = Project.load(root)
    monkeypatch.chdir(tmp_path)
    assert loaded.config_template("templates/configs/ok.yaml") == "configs/ok.yaml"
    assert loaded.config_template(str(tmp_path / "templates/configs/ok.yaml")) == "configs/ok.yaml"
    assert main(["-t", "templates/configs/ok.yaml", "pp"]) == 0
    assert capsys.readouterr().out.strip() == "a: 1"


def test_a_path_outside_the_template_directories_is_still_not_found(tmp_path, capsys, monkeypatch):
    root = project(tmp_path, {"ok.yaml": "a: 1\n"})
    write(tmp_path, {"elsewhere/x.yaml": "b: 2\n"})
    monkeypatch.chdir(tmp_path)
    assert Project.load(root).config_template("elsewhere/x.yaml") == "configs/elsewhere/x.yaml"
    assert main(["-t", "elsewhere/x.yaml", "pp"]) == 2
    assert "template 'configs/elsewhere/x.yaml' not found" in capsys.readouterr().err


def test_a_configs_name_wins_over_a_file_of_that_name_in_the_current_directory(tmp_path, monkeypatch):
    root = project(tmp_path, {"project.yaml": "a: 1\n"})
    write(tmp_path, {"templates/project.yaml": "b: 2\n"})
    monkeypatch.chdir(tmp_path / "templates")
    assert Project.load(root).config_template("project.yaml") == "configs/project.yaml"


@pytest.mark.parametrize("tag", ["if true", "for x in [1]"])
def test_a_statement_left_open_in_a_block_names_what_to_close_not_an_endblock_never_written(tmp_path, tag):
    error = render_error(tmp_path, {"base.yaml": "a: 1\n-- block model\nm: 1\n-- endblock\n",
                                    "c.yaml": f"-- extends 'base.yaml'\n[model]\n-- {tag}\nx: 1\n[other]\ny: 2\n"}, "c.yaml")
    opened = tag.split()[0]
    assert error.location == (str(tmp_path / "c.yaml"), 4)
    assert f"with its '-- {opened}' still open; close it (-- end{opened}) inside the block" in error.message
    assert "endblock" not in error.message


def test_a_missing_key_of_a_set_value_is_not_called_an_undefined_variable(tmp_path, capsys):
    """`{{ q.z }}` with q set: the advice to set q above its use misled; the key after the dot is what is missing."""
    root = project(tmp_path, {"c.yaml": '-- set q = {"x": 1}\na: {{ q.z }}\n'})
    assert main(["-p", root, "-t", "c.yaml", "pp"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {root}/templates/configs/c.yaml:2: no such attribute or key: 'dict object' has no "
                           "attribute 'z'")
    assert "set it above" not in line
