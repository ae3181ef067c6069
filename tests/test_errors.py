"""Bad input: every error names the author's file and line (and the chain that led there)."""

from __future__ import annotations

import pytest

from forgather.project import Project
from forgather.template import TemplateEnvironment, TemplateError, TemplateWarning
from helpers.template_files import render_error, write


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


def test_a_yaml_error_in_a_one_file_config_names_its_line_alone(tmp_path):
    """The requested template leads the chain only when the line is elsewhere: a mistake in the config's own
    file is one line, `file:line: message`, with no `from file:1` after it."""
    loaded = make_project(tmp_path, "ok: 1\nbroken: [1, 2\nafter: 3\n").load_config("c.yaml")
    with pytest.raises(TemplateError) as caught:
        loaded.graph
    assert caught.value.chain == [caught.value.location] and "  from " not in str(caught.value)
    assert caught.value.location.path == str(tmp_path / "templates/configs/c.yaml")


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


def test_a_tab_that_indents_a_line_is_named_as_a_tab(tmp_path):
    project = make_project(tmp_path, "model:\n  width: 2\n\tdepth: 3\n")
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").graph
    assert caught.value.location.line == 3
    assert "a tab character where YAML reads indentation or a token; indent with spaces" in str(caught.value)


def test_an_alias_to_a_node_a_block_renamed_away_names_the_alias_and_how_to_name_a_node(tmp_path):
    """A child replaces a block that defined `&optimizer` with a node of no name; the base's later
    `*optimizer` is the base's line, named, with what to write."""
    project = make_project(
        tmp_path,
        "-- extends 'base.yaml'\n[optimizer]\noptimizer: !partial:torch.optim:AdamW { lr: 1.0e-3 }\n",
        {"templates/base.yaml": "## base\n[optimizer]\n.define: &optimizer !partial:torch.optim:SGD { lr: 0.1 }\n"
                                "[uses]\nuses: *optimizer\n"},
    )
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").graph
    assert "found undefined alias *optimizer: no node above it is named optimizer" in str(caught.value)
    assert "`&optimizer` before its tag" in str(caught.value)


def test_unknown_tag_is_located(tmp_path):
    project = make_project(tmp_path, "a: 1\nb: !cal:torch.nn:Linear [1, 2]\n")
    with pytest.raises(TemplateError, match="unknown tag !cal:torch.nn:Linear; did you mean !call:?") as caught:
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
    assert "model.layer" in str(caught.value)
    # refused at the node by the parameter's annotation, before torch's own TypeError from inside Linear
    assert "Linear's parameter 'in_features' takes int; got str 'two'" in str(caught.value)


def test_missing_variable_value_says_how_to_set_it(tmp_path):
    project = make_project(tmp_path, "opt: !partial:torch.optim:SGD\n  lr: !var lr\n")
    with pytest.raises(TemplateError, match=r"no value given for 'lr'.*lr=\.\.\."):
        project.load_config("c.yaml").construct("opt")


def test_top_level_must_be_a_mapping(tmp_path):
    project = make_project(tmp_path, "- 1\n- 2\n")
    with pytest.raises(TemplateError, match="mapping of targets"):
        project.load_config("c.yaml").graph


def test_yaml_mistake_noticed_in_the_next_template_is_reported_where_it_is(tmp_path):
    project = make_project(
        tmp_path,
        "-- extends 'base.yaml'\n[loss]\nloss: [1, 2\n",
        {
            "templates/base.yaml": "[loss]\n-- include 'loss.yaml'\n[optimizer]\n-- include 'optimizer.yaml'\n",
            "templates/loss.yaml": "loss: 1\n",
            "templates/optimizer.yaml": "## an optimizer\noptimizer: sgd\n",
        },
    )
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").graph
    assert caught.value.location == (str(tmp_path / "templates/configs/c.yaml"), 3)
    assert f"noticed it at {tmp_path / 'templates/optimizer.yaml'}:2" in str(caught.value)


def test_a_yaml_error_inside_one_template_stays_at_its_line(tmp_path):
    project = make_project(tmp_path, "-- include 'part.yaml'\nb: [1\nc: 2\n", {"templates/part.yaml": "a: 1\n"})
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").graph
    assert caught.value.location.path.endswith("c.yaml") and caught.value.location.line in (2, 3)


def test_templates_cannot_reach_python_internals(tmp_path):
    source = "a: {{ cycler.__init__.__globals__.os.popen('echo hi').read() }}\n"
    error = render_error(tmp_path, {"t.yaml": source}, "t.yaml")
    assert error.location == (str(tmp_path / "t.yaml"), 1)
    assert "refused by the template sandbox" in str(error) and len(str(error).splitlines()) == 1


def test_a_nul_byte_is_a_one_line_error_at_its_line(tmp_path):
    (tmp_path / "t.yaml").write_bytes(b"a: 1\nb: \x00\n")
    (tmp_path / "u.yaml").write_text("-- include 't.yaml'\n")
    with pytest.raises(TemplateError) as caught:
        TemplateEnvironment([str(tmp_path)]).render("u.yaml")
    assert caught.value.location == (str(tmp_path / "t.yaml"), 2)
    assert "NUL byte" in caught.value.message and "\x00" not in str(caught.value)


@pytest.mark.parametrize("statement", ["include", "extends"])
def test_an_include_or_extends_cycle_is_a_short_error_at_the_closing_line(tmp_path, statement):
    files = {"a.yaml": f"x: 1\n-- {statement} 'b.yaml'\n", "b.yaml": f"y: 1\n\n-- {statement} 'a.yaml'\n"}
    error = render_error(tmp_path, files, "a.yaml")
    assert "cycle (a.yaml -> b.yaml -> a.yaml)" in error.message
    assert error.chain == [(str(tmp_path / "a.yaml"), 2), (str(tmp_path / "b.yaml"), 3), (str(tmp_path / "a.yaml"), 2)]
    assert len(str(error).splitlines()) == 3


UNKNOWN_BLOCK = {
    "base.yaml": "[optimizer]\noptimizer:\n    [optimizer_args]\n    lr: 1\n[model]\nmodel: m\n",
    "child.yaml": "-- extends 'base.yaml'\n[optimzer_args]\n    lr: 2\n",
}


def test_a_block_no_ancestor_defines_is_a_warning_naming_the_close_match(tmp_path, monkeypatch):
    monkeypatch.delenv("FORGATHER_STRICT", raising=False)
    write(tmp_path, UNKNOWN_BLOCK)
    with pytest.warns(TemplateWarning, match=r"block \[optimzer_args\].*did you mean \[optimizer_args\]") as caught:
        out = TemplateEnvironment([str(tmp_path)]).render("child.yaml")
    assert out == "optimizer:\n    lr: 1\n\n\nmodel: m\n"
    assert (caught[0].filename, caught[0].lineno) == (str(tmp_path / "child.yaml"), 2)


def test_an_unknown_block_opened_by_a_block_statement_is_located_too(tmp_path):
    files = {**UNKNOWN_BLOCK, "child.yaml": "-- extends 'base.yaml'\n\n-- block optimzer_args\n    lr: 2\n-- endblock\n"}
    write(tmp_path, files)
    with pytest.raises(TemplateError) as caught:
        TemplateEnvironment([str(tmp_path)], strict=True).render("child.yaml")
    assert caught.value.location == (str(tmp_path / "child.yaml"), 3)


def test_strict_mode_makes_an_unknown_block_an_error(tmp_path, monkeypatch):
    write(tmp_path, UNKNOWN_BLOCK)
    with pytest.raises(TemplateError, match=r"child.yaml:2: block \[optimzer_args\]"):
        TemplateEnvironment([str(tmp_path)], strict=True).render("child.yaml")
    monkeypatch.setenv("FORGATHER_STRICT", "1")
    with pytest.raises(TemplateError, match="did you mean"):
        TemplateEnvironment([str(tmp_path)]).render("child.yaml")


def test_text_a_child_leaves_outside_its_blocks_is_a_warning_at_its_line_and_strictly_an_error(tmp_path, monkeypatch):
    """Jinja drops what an extending template writes outside its blocks; comments and blank lines say nothing."""
    monkeypatch.delenv("FORGATHER_STRICT", raising=False)
    files = {"base.yaml": "[model]\nmodel: m\n",
             "child.yaml": "-- set width = 4\n-- extends 'base.yaml'\n\n# a YAML comment\n\nseed: 7\n[model]\nmodel: n\n"}
    write(tmp_path, files)
    with pytest.warns(TemplateWarning, match=r"text outside any block of 'child.yaml'.*is never rendered") as caught:
        out = TemplateEnvironment([str(tmp_path)]).render("child.yaml")
    assert out == "model: n\n" and [(w.filename, w.lineno) for w in caught] == [(str(tmp_path / "child.yaml"), 6)]
    with pytest.raises(TemplateError, match=r"child.yaml:6: text outside any block"):
        TemplateEnvironment([str(tmp_path)], strict=True).render("child.yaml")
    write(tmp_path, {"quiet.yaml": "-- extends 'base.yaml'\n## a Forgather comment\n# a YAML one\n\n[model]\nmodel: q\n"})
    assert TemplateEnvironment([str(tmp_path)], strict=True).render("quiet.yaml") == "model: q\n"


def test_new_blocks_inside_an_override_and_skipped_blocks_of_the_base_are_no_mistake(tmp_path):
    files = {
        "base.yaml": "[model]\nmodel: m\n-- if false\n-- block extra\nextra: 1\n-- endblock extra\n-- endif\n",
        "child.yaml": "-- extends 'base.yaml'\n[model]\nmodel:\n    [model_args]\n    size: 1\n[extra]\nextra: 2\n",
        "grandchild.yaml": "-- extends 'child.yaml'\n[model_args]\n    size: 2\n",
    }
    write(tmp_path, files)
    env = TemplateEnvironment([str(tmp_path)], strict=True)
    assert env.render("grandchild.yaml") == "model:\n    size: 2\n\n"


def test_every_rendered_line_maps_back_to_the_line_that_wrote_it(tmp_path):
    files = {
        "base.yaml": "## base\nhead: 1\n[body]\n    a: 1\n    [inner!]\n\n    b: 2\n\n[tail]\ntail: {{ 3 }}\n",
        "child.yaml": "-- extends 'base.yaml'\n[body]\n    == super()\n    c: 3\n    => 'x: 4'\n",
    }
    write(tmp_path, files)
    env = TemplateEnvironment([str(tmp_path)])
    rendered = env.render("child.yaml").split("\n")
    located = env.locate_lines("child.yaml")
    base, child = str(tmp_path / "base.yaml"), str(tmp_path / "child.yaml")
    assert len(located) == len(rendered)
    by_text = {text: location for text, location in zip(rendered, located) if text}
    assert by_text == {
        "head: 1": (base, 2), "    a: 1": (base, 4), "b: 2": (base, 7),
        "    c: 3": (child, 4), "x: 4": (child, 5), "tail: 3": (base, 10),
    }



def test_a_mistake_raised_in_a_dataloader_worker_is_reported_as_raised_there():
    # torch re-raises it as "Caught ValueError in DataLoader worker process 0." and the worker's traceback
    from torch.utils.data import DataLoader

    from forgather.errors import describe
    from helpers.damaged_data import DamagedData

    with pytest.raises(ValueError) as raised:
        list(DataLoader(DamagedData(), num_workers=1))
    assert str(raised.value).startswith("Caught ValueError in DataLoader worker process 0.")
    assert describe(raised.value) == "/data/part-0.jsonl: line 3 is not JSON; fix or remove it"


@pytest.mark.parametrize("signal_name, hint", [("SIGKILL", "out-of-memory killer"), ("SIGBUS", "/dev/shm"),
                                               ("SIGTERM", "rerun with num_workers=0")])
def test_a_dataloader_worker_that_dies_is_one_line_saying_what_to_do(signal_name, hint):
    # Before: torch's "DataLoader worker (pid(s) N) exited unexpectedly" and a traceback, no word of what to change
    import signal

    from torch.utils.data import DataLoader

    from forgather.errors import describe
    from helpers.damaged_data import DyingWorker

    with pytest.raises(RuntimeError) as raised:
        list(DataLoader(DyingWorker(getattr(signal, signal_name)), num_workers=1))
    line = describe(raised.value)
    assert line.startswith("DataLoader worker (pid") and hint in line and "\n" not in line, line
