"""Rules of the reference Forgather (jdinalt/forgather, the spec) that a template or config author sees, checked
against our implementation where no other test file already checks them. Grouped by stage: templates, YAML
tags, the config, construction, code generation, and the graph's YAML dump."""

from __future__ import annotations

import functools
import os
import textwrap

import pytest
import yaml
from omegaconf import OmegaConf

from forgather.graph import construct, dump_graph, generate_code, load_graph, to_config
from forgather.graph.construct import ConstructError
from forgather.graph.yaml_loader import GraphError
from forgather.template import TemplateEnvironment
from graph_helpers import BOX_SPEC, Box


def render(tmp_path, files: dict[str, str], name: str) -> str:
    for file_name, text in files.items():
        path = tmp_path / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return TemplateEnvironment([str(tmp_path)]).render(name)


def build(text: str, target: str | None = None, base_dir: str | None = None):
    return construct(to_config(load_graph(text)).config, target, base_dir=base_dir)


def run_code(code: str, **kwargs):
    namespace: dict = {}
    exec(compile(code, "<generated>", "exec"), namespace)
    return namespace["construct"](**kwargs)


# -- templates ----------------------------------------------------------------------------------------------


def test_a_sub_template_name_may_hold_slashes_and_dots(tmp_path):
    """A separator's name takes word characters, `.` and `/`: `#--- parts/opt.base ---` names a sub-template."""
    files = {"main.yaml": "main: 1\n-- include 'parts/opt.base'\n#--- parts/opt.base ---\nopt: sgd\n"}
    assert render(tmp_path, files, "main.yaml") == "main: 1\nopt: sgd"


def test_a_separator_may_have_whitespace_between_the_hash_and_the_dashes(tmp_path):
    """`# --- name ---` splits a file like `#--- name ---`; the main template keeps the file's name."""
    (tmp_path / "two.yaml").write_text("first: 1\n\n# --- second.part ---\nsecond: 2\n")
    env = TemplateEnvironment([str(tmp_path)])
    assert env.render("two.yaml") == "first: 1"
    assert env.render("second.part") == "second: 2"


def test_the_templates_a_template_extends_are_found_in_either_spelling(tmp_path):
    """`-- extends 'x'` and `{% extends 'x' %}` both name the parent; a template that extends nothing names none."""
    (tmp_path / "base.yaml").write_text("[a]\nx: 1\n")
    (tmp_path / "line.yaml").write_text("-- extends 'base.yaml'\n[a]\nx: 2\n")
    (tmp_path / "tag.yaml").write_text("{% extends \"base.yaml\" %}\n[a]\nx: 3\n")
    env = TemplateEnvironment([str(tmp_path)])
    assert env.references("line.yaml") == ["base.yaml"]
    assert env.references("tag.yaml") == ["base.yaml"]
    assert env.references("base.yaml") == []


@pytest.mark.parametrize(
    ("value", "written"),
    [(-7, "-7"), (0, "0"), (False, "False"), ([3, "x", None], "[3, x, null]"), ({}, "{}"), ([], "[]"),
     ("plain words", "plain words"), ("key: value", "'key: value'"), ("null", "'null'")],
)
def test_toyaml_writes_each_value_as_yaml_reads_it_back(tmp_path, value, written):
    """toyaml: ints and bools by str(), a list in flow style, empty collections as {} and [], and a string
    quoted only where YAML would read it as something else."""
    env = TemplateEnvironment([str(tmp_path)])
    (tmp_path / "t.yaml").write_text("v: {{ value | toyaml }}\n")
    out = env.render("t.yaml", value=value)
    assert out == f"v: {written}"
    assert yaml.safe_load(out)["v"] == value


def test_the_remaining_path_and_time_globals(tmp_path):
    """dirname, basename, splitext, modname_from_path (a file's module name), repr, utcfiletime and utcnow()."""
    source = (
        "{{ dirname('/a/b/model.py') }} {{ basename('/a/b/model.py') }} {{ splitext('model.py') }}\n"
        "{{ modname_from_path('/a/b/model.py') }} {{ repr('x') }}\n"
        "{{ utcfiletime() }} {{ utcnow().tzname() }}\n"
    )
    first, second, third = render(tmp_path, {"t.yaml": source}, "t.yaml").split("\n")
    assert first == "/a/b model.py ('model', '.py')" and second == "model 'x'"
    stamp, zone = third.split()
    assert len(stamp) == len("2026-01-02T03-04-05") and ":" not in stamp and zone == "UTC"


# -- YAML tags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tag", "empty"), [("!list", []), ("!tuple", ()), ("!dict", {}), ("!dlist", [])])
@pytest.mark.parametrize("quotes", ["''", '""'])
def test_a_collection_tag_on_a_quoted_empty_string_is_an_empty_collection(tag, empty, quotes):
    """An empty scalar after a collection tag, quoted or not, is the empty collection."""
    built = build(f"a: {tag} {quotes}\n")
    assert built["a"] == empty and type(built["a"]) is type(empty)


def test_a_call_tag_on_an_empty_string_has_no_arguments():
    """A call tag's scalar is its one positional argument, unless it is empty (quoted or not): then there are none."""
    built = build(f"a: !call:{BOX_SPEC} ''\nb: !call:{BOX_SPEC} \"\"\nc: !call:{BOX_SPEC} text\n")
    assert built["a"].args == () and built["b"].args == () and built["c"].args == ("text",)


def test_args_alone_or_kwargs_alone_is_the_explicit_form():
    """A mapping holding only `args` (a list) or only `kwargs` (a mapping) gives the positional or the keyword
    arguments, as `{args, kwargs}` does."""
    built = build(f"p: !call:{BOX_SPEC} {{args: [1, 2]}}\nk: !call:{BOX_SPEC} {{kwargs: {{x: 1}}}}\n")
    assert (built["p"].args, built["p"].kwargs) == ((1, 2), {})
    assert (built["k"].args, built["k"].kwargs) == ((), {"x": 1})


def test_a_null_args_or_kwargs_is_an_ordinary_keyword():
    """The explicit form needs values: `{args: null}` is the keyword argument `args=None`, and
    `{args: [1], kwargs: null}` the keywords `args` and `kwargs`."""
    built = build(f"a: !call:{BOX_SPEC} {{args: null}}\nb: !call:{BOX_SPEC} {{args: [1], kwargs: null}}\n")
    assert (built["a"].args, built["a"].kwargs) == ((), {"args": None})
    assert (built["b"].args, built["b"].kwargs) == ((), {"args": [1], "kwargs": None})


@pytest.mark.parametrize(("text", "expected"), [("{args: 0}", "args must be a list"), ("{kwargs: ''}", "kwargs must be a mapping")])
def test_an_args_or_kwargs_of_the_wrong_type_is_an_error_even_when_falsy(text, expected):
    """A non-null `args` that is no list, or `kwargs` that is no mapping, is refused, a falsy one (0, '') too."""
    with pytest.raises(GraphError, match=expected):
        load_graph(f"a: !call:{BOX_SPEC} {text}\n")


def test_the_reference_bare_targets_for_collections_and_keys():
    """Bare `named_list`, `named_tuple`, `named_dict` are list, tuple, dict; bare `keys` lists a mapping's keys."""
    built = build(
        "l: !call:named_list [[1, 2]]\nt: !call:named_tuple [[1, 2]]\nd: !call:named_dict {x: 1}\n"
        "k: !call:list [!call:keys [{p: 1, q: 2}]]\n"
    )
    assert built == {"l": [1, 2], "t": (1, 2), "d": {"x": 1}, "k": ["p", "q"]}


def test_an_attribute_path_may_go_through_a_submodule():
    """After the colon, a dotted path of attributes: `os:path.join` is os.path.join."""
    assert build("a: !call:os:path.join [x, y]\n")["a"] == os.path.join("x", "y")


def test_a_relative_file_target_resolves_from_the_current_directory(tmp_path, monkeypatch):
    """A target naming a Python file by a relative path (`./src/x.py:Name`, `src/x.py:Name`) is found from the
    current directory, not from the project's model source directory (which only `.relative:Name` uses)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "helpers_here.py").write_text("def answer():\n    return 42\n")
    (tmp_path / "model_src").mkdir()
    monkeypatch.chdir(tmp_path)
    text = "a: !call:./src/helpers_here.py:answer []\nb: !call:src/helpers_here.py:answer []\n"
    assert build(text, base_dir=str(tmp_path / "model_src")) == {"a": 42, "b": 42}
    assert run_code(generate_code(to_config(load_graph(text)).config, base_dir=str(tmp_path / "model_src"))) == {"a": 42, "b": 42}


def test_a_projects_relative_file_target_resolves_from_the_project_wherever_it_runs(tmp_path, monkeypatch):
    """The reference's CLI works in the project directory, so a project's `../lib/x.py:Name` is relative to it:
    a project's config anchors such paths there, for construction, code and the saved config alike."""
    from forgather.project import Project

    project = tmp_path / "projects" / "p"
    (project / "templates" / "configs").mkdir(parents=True)
    (project / "meta.yaml").write_text("name: p\n")
    (project / "templates" / "configs" / "c.yaml").write_text("a: !call:../lib/helpers_there.py:answer []\n")
    (tmp_path / "projects" / "lib").mkdir()
    (tmp_path / "projects" / "lib" / "helpers_there.py").write_text("def answer():\n    return 7\n")
    monkeypatch.chdir(tmp_path)  # elsewhere
    loaded = Project.load(str(project)).load_config("c.yaml")
    assert loaded.config.a._target_ == f"{tmp_path}/projects/lib/helpers_there.py:answer"
    assert loaded.construct("a") == 7
    assert run_code(loaded.code("a")) == 7


def test_constructing_every_target_leaves_out_the_var_settings(tmp_path):
    """A `!var` is a setting, not a target: a project's construction of every target does not return it."""
    from forgather.project import Project

    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: p\n")
    (tmp_path / "templates" / "configs" / "c.yaml").write_text(
        "a: !call:builtins:dict {lr: !var {name: lr, default: 0.1}}\nb: 3\n")
    loaded = Project.load(str(tmp_path)).load_config("c.yaml")
    assert "lr" in loaded.config and loaded.construct() == {"a": {"lr": 0.1}, "b": 3}
    assert run_code(loaded.code()) == {"a": {"lr": 0.1}, "b": 3}


def test_an_empty_or_null_document_is_a_config_without_targets():
    """An empty YAML document, or one that is only `~`, loads: it has no targets and builds nothing."""
    for text in ("", "~\n", "# only a comment\n"):
        graph = load_graph(text)
        assert graph.targets == [] and construct(to_config(graph).config) == {}


# -- the config and construction ----------------------------------------------------------------------------


def test_mapping_keys_that_are_numbers_or_booleans_stay_so():
    """A plain mapping keeps YAML's key types (`{0: neg, 1: pos}` has int keys, as for a label map), through the
    config, a dump and reload of it, and generated code."""
    text = f"a: !call:{BOX_SPEC} {{id2label: {{0: neg, 1: pos}}}}\nb: {{1.5: x, true: y, name: z, 2: 'cost: ${{x}}'}}\n"
    config = to_config(load_graph(text)).config
    built = construct(config)
    assert built["a"].kwargs["id2label"] == {0: "neg", 1: "pos"}
    assert built["b"] == {1.5: "x", True: "y", "name": "z", 2: "cost: ${x}"}
    reloaded = OmegaConf.create(yaml.safe_load(OmegaConf.to_yaml(config)))
    assert construct(reloaded)["a"].kwargs["id2label"] == {0: "neg", 1: "pos"}
    assert run_code(generate_code(config))["b"] == built["b"]


def test_a_node_shared_inside_a_mapping_with_number_keys_is_still_shared():
    """Sharing holds for a node under a non-string key (it cannot be interpolated by path, so it is written
    again with its id)."""
    text = f"a: {{0: &s !call:{BOX_SPEC} [1]}}\nb: *s\n"
    built = build(text)
    assert built["b"] is built["a"][0]
    generated = run_code(generate_code(to_config(load_graph(text)).config))
    assert generated["b"] is generated["a"][0]


def test_a_singleton_whose_call_returns_none_is_called_once(monkeypatch):
    """One object per singleton, even when that object is None (the reference calls it again at each alias, a
    bug its own tests mark)."""
    import graph_helpers

    calls = []
    monkeypatch.setattr(graph_helpers, "takes_any", lambda **kwargs: calls.append(kwargs))
    built = build("a: &n !call:graph_helpers:takes_any {}\nb: [*n, *n]\n")
    assert built == {"a": None, "b": [None, None]} and len(calls) == 1


@pytest.mark.parametrize("tag", ["!partial", "!call", "!factory"])
def test_a_target_that_is_not_callable_is_an_error_at_its_node(tag):
    """A target must be callable; one that is not (a constant, a module) fails at its config path, partials too."""
    config = to_config(load_graph(f"outer: {{inner: {tag}:math:pi []}}\n")).config
    with pytest.raises(ConstructError, match=r"outer\.inner: .*math:pi.* is a float, not a callable"):
        construct(config)


# -- code generation ----------------------------------------------------------------------------------------


def test_generated_code_inlines_a_node_used_once_and_names_a_shared_one():
    """In generated code a node used once is written where it is used; a node used twice, named or not, is a
    local variable built once."""
    text = f"once: !call:{BOX_SPEC} [1]\n.s: &s !call:{BOX_SPEC} [2]\na: *s\nb: [*s]\n"
    code = generate_code(to_config(load_graph(text)).config)
    assert "'once': Box(1)" in code and code.count("Box(2)") == 1
    built = run_code(code)
    assert built["b"][0] is built["a"] and isinstance(built["once"], Box)


# -- the graph's YAML dump ----------------------------------------------------------------------------------


def test_a_named_node_used_twice_is_dumped_under_its_own_name_as_anchor():
    """`forgather graph --format yaml`: a shared node named `@box` is written `&box` and aliased `*box`."""
    dumped = dump_graph(load_graph(f"a: &x !singleton:{BOX_SPEC}@box [1]\nb: [*x, *x]\nc: &y !list [2]\nd: *y\n"))
    assert "&box !singleton:" in dumped and dumped.count("*box") == 2
    again = build(dumped)
    assert again["b"][0] is again["a"] and again["d"] is again["c"]


def test_a_multiline_string_is_dumped_as_a_literal_block():
    """Multi-line strings are written as `|` blocks, which read back to the same text."""
    graph = load_graph('s: "line one\\nline two\\n"\nt: !call:builtins:str ["a\\nb"]\n')
    dumped = dump_graph(graph)
    assert "s: |" in dumped and "line one\n" in dumped
    assert build(dumped) == {"s": "line one\nline two\n", "t": "a\nb"}


def test_a_partial_reads_the_same_after_a_dump():
    """A dumped partial loads back as a partial with the same arguments."""
    built = build(dump_graph(load_graph("p: !partial:builtins:pow {arg0: 2}\n")))
    assert isinstance(built["p"], functools.partial) and built["p"](5) == 32


def test_keywords_named_like_the_argument_forms_survive_a_dump():
    """A keyword argument named `args`, `kwargs` or `arg0` (given through `{args, kwargs}`) is dumped so that it
    reads back as that keyword, not as positional arguments."""
    text = f"a: !call:{BOX_SPEC} {{args: [], kwargs: {{args: [1], arg0: 5, kwargs: 2}}}}\nb: !call:{BOX_SPEC} {{kwargs: {{args: [1]}}}}\n"
    built = build(dump_graph(load_graph(text)))
    assert (built["a"].args, built["a"].kwargs) == ((), {"args": [1], "arg0": 5, "kwargs": 2})
    assert (built["b"].args, built["b"].kwargs) == ((), {"args": [1]})
