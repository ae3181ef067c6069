"""Bad input: every error names the author's file and line (and the chain that led there)."""

from __future__ import annotations

import textwrap

import pytest

from forgather.project import Project
from forgather.template import TemplateEnvironment, TemplateError


def write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def render_error(tmp_path, files, name) -> TemplateError:
    write(tmp_path, files)
    with pytest.raises(TemplateError) as caught:
        TemplateEnvironment([str(tmp_path)]).render(name)
    return caught.value


def make_project(tmp_path, config_text: str, extra: dict[str, str] | None = None) -> Project:
    write(tmp_path, {"meta.yaml": "name: p\n", "templates/configs/c.yaml": config_text, **(extra or {})})
    return Project.load(str(tmp_path))


def test_syntax_error_names_file_and_line(tmp_path):
    error = render_error(tmp_path, {"t.yaml": "a: 1\nb: 2\nc: {{ 1 + }}\n"}, "t.yaml")
    assert error.location.path == str(tmp_path / "t.yaml") and error.location.line == 3
    assert "syntax error" in str(error)


def test_syntax_error_in_a_sub_template_names_the_line_of_the_file(tmp_path):
    files = {"t.yaml": "a: 1\n#---- t.sub ----\nb: 2\n-- if\n", "u.yaml": "-- include 't.yaml'\n-- include 't.sub'\n"}
    write(tmp_path, files)
    env = TemplateEnvironment([str(tmp_path)])
    with pytest.raises(TemplateError) as caught:
        env.render("u.yaml")
    assert caught.value.location.line == 4 and caught.value.location.path.endswith("t.yaml")
    assert str(tmp_path / "u.yaml") + ":2" in str(caught.value)


def test_undefined_variable_names_use_site_and_the_extends_chain(tmp_path):
    files = {"base.yaml": "x: 1\n[b]\n", "child.yaml": "-- extends 'base.yaml'\n[b]\n\ny: {{ nope }}\n"}
    error = render_error(tmp_path, files, "child.yaml")
    assert error.location == (str(tmp_path / "child.yaml"), 4)
    assert [link.path for link in error.chain[:-1]] == [str(tmp_path / "child.yaml"), str(tmp_path / "base.yaml")]
    assert "'nope' is undefined" in str(error)


def test_missing_template_names_the_including_line_and_suggests(tmp_path):
    files = {"optimizer.yaml": "o: 1\n", "t.yaml": "a: 1\n-- include 'optimiser.yaml'\n"}
    error = render_error(tmp_path, files, "t.yaml")
    assert error.location == (str(tmp_path / "t.yaml"), 2)
    assert "did you mean 'optimizer.yaml'" in str(error)


def test_exception_inside_an_expression_is_located(tmp_path):
    error = render_error(tmp_path, {"t.yaml": "a:\n  b: {{ 1 // 0 }}\n"}, "t.yaml")
    assert error.location.line == 2 and "ZeroDivisionError" in str(error)


def test_yaml_error_is_mapped_to_the_template_line(tmp_path):
    project = make_project(
        tmp_path,
        "-- extends 'base.yaml'\n[body]\nok: 1\nbroken: [1, 2\nafter: 3\n",
        {"templates/base.yaml": "## base\nhead: 1\n[body]\n"},
    )
    loaded = project.load_config("c.yaml")
    with pytest.raises(TemplateError) as caught:
        loaded.graph
    location = caught.value.location
    assert location.path == str(tmp_path / "templates/configs/c.yaml") and location.line in (4, 5)
    assert "YAML syntax error" in str(caught.value)


def test_unknown_tag_is_located(tmp_path):
    project = make_project(tmp_path, "a: 1\nb: !cal:torch.nn:Linear [1, 2]\n")
    with pytest.raises(TemplateError, match="unknown tag !cal:torch.nn:Linear") as caught:
        project.load_config("c.yaml").graph
    assert caught.value.location.line == 2


def test_unknown_import_target_is_located_with_a_suggestion(tmp_path):
    project = make_project(tmp_path, "a: 1\n\nlayer: !singleton:torch.nn:Linaer [1, 2]\n")
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").construct("layer")
    assert caught.value.location == (str(tmp_path / "templates/configs/c.yaml"), 3)
    assert "did you mean Linear" in str(caught.value)


def test_unknown_module_says_what_to_install(tmp_path):
    project = make_project(tmp_path, "x: !singleton:not_a_package.sub:Thing []\n")
    with pytest.raises(TemplateError, match="not_a_package"):
        project.load_config("c.yaml").construct("x")


def test_wrong_argument_type_names_the_config_path_and_line(tmp_path):
    project = make_project(tmp_path, "model:\n  layer: !singleton:torch.nn:Linear\n    in_features: two\n    out_features: 3\n")
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").construct("model")
    assert caught.value.location.line == 2
    assert "model.layer" in str(caught.value) and "TypeError" in str(caught.value)


def test_missing_variable_value_says_how_to_set_it(tmp_path):
    project = make_project(tmp_path, "opt: !partial:torch.optim:SGD\n  lr: !var lr\n")
    with pytest.raises(TemplateError, match=r"no value given for 'lr'.*lr=\.\.\."):
        project.load_config("c.yaml").construct("opt")


def test_top_level_must_be_a_mapping(tmp_path):
    project = make_project(tmp_path, "- 1\n- 2\n")
    with pytest.raises(TemplateError, match="mapping of targets"):
        project.load_config("c.yaml").graph
