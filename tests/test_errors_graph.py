"""Mistakes in a config's YAML that used to pass silently or end in a RecursionError: each is one located error."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from forgather.graph import GraphError, GraphWarning, construct, load_graph, to_config
from forgather.graph.yaml_loader import MAX_DEPTH
from forgather.project import Project
from forgather.template import TemplateError, TemplateWarning


def graph_error(text: str, strict: bool | None = None) -> GraphError:
    with pytest.raises(GraphError) as caught:
        load_graph(textwrap.dedent(text), strict=strict)
    return caught.value


def write_project(tmp_path, files: dict[str, str]) -> Project:
    for name, text in {"meta.yaml": "name: p\n", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return Project.load(str(tmp_path))


def project_error(tmp_path, files: dict[str, str]) -> str:
    project = write_project(tmp_path, files)
    with pytest.raises(TemplateError) as caught:
        project.load_config("c.yaml").graph
    return str(caught.value)


DUPLICATE = """\
    optimizer:
      lr: 0.1
      momentum: 0.9
      lr: 0.2
    """


def test_a_duplicate_key_is_an_error_in_strict_mode_naming_both_lines():
    error = graph_error(DUPLICATE, strict=True)
    assert error.line == 4 and "duplicate key 'lr' (also at line 2)" in error.message


def test_a_duplicate_key_warns_by_default_and_the_last_one_wins(monkeypatch):
    # The reference Forgather's templates override an inherited key by repeating it: it must still load.
    monkeypatch.delenv("FORGATHER_STRICT", raising=False)
    with pytest.warns(GraphWarning, match=r"line 4: duplicate key 'lr' \(also at line 2\)"):
        graph = load_graph(textwrap.dedent(DUPLICATE))
    assert construct(to_config(graph).config)["optimizer"] == {"lr": 0.2, "momentum": 0.9}


def test_strict_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FORGATHER_STRICT", "1")
    assert "duplicate key 'lr'" in graph_error(DUPLICATE).message


PARTS = {
    "templates/configs/c.yaml": "-- include 'part.yaml'\nmomentum: 0.9\n",
    "templates/part.yaml": "## a part\nlr: 1\nlr: 2\n\n",  # Jinja drops one final newline of an included file
}


def test_a_duplicate_key_in_an_included_template_names_both_template_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGATHER_STRICT", "1")
    message = project_error(tmp_path, PARTS)
    assert message.startswith(f"{tmp_path}/templates/part.yaml:3: duplicate key 'lr'")
    assert f"(also at {tmp_path}/templates/part.yaml:2)" in message


def test_a_duplicate_key_warning_points_at_the_template_line(tmp_path, monkeypatch):
    monkeypatch.delenv("FORGATHER_STRICT", raising=False)
    project = write_project(tmp_path, PARTS)
    with pytest.warns(TemplateWarning) as caught:
        project.load_config("c.yaml").graph
    found = [w for w in caught if "duplicate key 'lr'" in str(w.message)]
    assert found and found[0].filename == f"{tmp_path}/templates/part.yaml" and found[0].lineno == 3
    assert f"(also at {tmp_path}/templates/part.yaml:2)" in str(found[0].message)


OVERRIDE = {  # the reference Forgather's way to change an inherited key: the parent's block, then the key again
    "templates/base.yaml": "optimizer:\n    [optimizer_args]\n    lr: 1\n    momentum: 0.9\n",
    "templates/configs/c.yaml": "-- extends 'base.yaml'\n[optimizer_args]\n    == super()\n    lr: 2\n",
}


@pytest.mark.parametrize("strict", ["0", "1"])
def test_a_key_written_again_by_a_child_template_is_an_override_without_a_warning(tmp_path, monkeypatch, strict):
    import warnings

    monkeypatch.setenv("FORGATHER_STRICT", strict)
    project = write_project(tmp_path, OVERRIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = project.load_config("c.yaml")
        assert construct(loaded.config)["optimizer"] == {"lr": 2, "momentum": 0.9}


def test_a_template_line_is_found_where_a_trim_filter_drops_a_line_that_renders_empty(tmp_path, monkeypatch):
    """Lines of the reference's templates that render empty inside `-- filter trim()` (its projects are full of
    them) are dropped from the YAML, but not from the render that marks each line with its template line: the
    two renders are aligned, not zipped (which named a line or a file off by the dropped lines)."""
    monkeypatch.setenv("FORGATHER_STRICT", "1")
    message = project_error(tmp_path, {
        "templates/configs/c.yaml": "-- filter trim()\n{{ '' }}\n{{ '' }}\nlr: 1\nmomentum: 0.9\nlr: 2\n-- endfilter\n",
    })
    assert message.startswith(f"{tmp_path}/templates/configs/c.yaml:6: duplicate key 'lr'")
    assert f"(also at {tmp_path}/templates/configs/c.yaml:4)" in message


def test_repeated_dot_keys_and_dlist_redeclarations_are_not_duplicates():
    graph = load_graph(".define: &a 1\n.define: &b 2\nx: [*a, *b]\nl: !dlist\n  p: 1\n  q: 2\n  p: 3\n")
    assert construct(to_config(graph).config) == {"x": [1, 2], "l": [3, 2]}


def test_merge_keys_may_be_overridden_by_explicit_keys():
    graph = load_graph("base: &base {a: 1, b: 2}\nchild:\n  <<: *base\n  b: 3\n")
    assert construct(to_config(graph).config)["child"] == {"a": 1, "b": 3}


@pytest.mark.parametrize("text", ["a: &x [1, *x]\n", "a: &x {b: *x}\n", "a: &x !call:builtins:list [*x]\n", "a: 1\nb: &x\n  c: [*x]\n"])
def test_a_recursive_alias_is_a_located_error(text):
    error = graph_error(text)
    assert "refers to itself" in error.message and error.line == text.count("\n", 0, text.index("&x")) + 1


def test_shared_aliases_are_not_recursion():
    graph = load_graph("a: &x [1, 2]\nb: [*x, *x]\nc: {d: *x}\n")
    assert construct(to_config(graph).config)["b"] == [[1, 2], [1, 2]]


def test_deep_nesting_is_a_one_line_error_not_a_recursion_error():
    depth = MAX_DEPTH + 1
    error = graph_error("a: 1\nb: " + "[" * depth + "]" * depth + "\n")
    assert error.line == 2 and f"deeper than {MAX_DEPTH} levels" in error.message


def test_very_deep_nesting_does_not_crash_the_yaml_composer():
    # libyaml's composer recurses in C: 100,000 levels crashed the interpreter before any Python check ran.
    probe = "from forgather.graph import GraphError, load_graph\ntry:\n    load_graph('a: ' + '[' * 100000 + ']' * 100000)\nexcept GraphError as e:\n    print(e)\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "deeper than" in result.stdout


def test_nesting_up_to_the_limit_loads():
    depth = MAX_DEPTH - 1
    assert load_graph("a: " + "[" * depth + "]" * depth + "\n").nodes["a"]


def test_the_same_var_with_two_defaults_names_both_places():
    error = graph_error("""\
        a: !var {name: lr, default: 0.1}
        b: !var lr
        c: !var {name: lr, default: 0.2}
        """)
    assert error.line == 3
    assert "!var 'lr' has default 0.2 here and 0.1 at line 1" in error.message


def test_the_same_var_with_one_default_repeated_is_fine():
    graph = load_graph("a: !var {name: lr, default: 0.1}\nb: !var {name: lr, default: 0.1}\nc: !var lr\n")
    assert to_config(graph).config.lr == 0.1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x: !call:builtins:dict {args: 5, kwargs: {}}\n", "args must be a list of positional arguments, got int 5"),
        ("x: !call:builtins:dict {args: [], kwargs: 7}\n", "kwargs must be a mapping of keyword arguments, got int 7"),
        ("x: !call:builtins:dict {args: 5, kwargs: 7}\n", "args must be a list"),
    ],
)
def test_args_and_kwargs_of_the_wrong_type_say_what_is_expected(text, expected):
    error = graph_error(text)
    assert error.line == 1 and expected in error.message


def test_underscore_args_that_is_not_a_list_is_a_construct_error_naming_the_key():
    from forgather.graph import ConstructError

    with pytest.raises(ConstructError) as caught:
        construct({"x": {"_target_": "builtins:dict", "_args_": 5}})
    assert caught.value.path == "x._args_" and "must be a list" in caught.value.message


def test_the_strict_flag_makes_a_duplicate_key_an_error(tmp_path, monkeypatch, capsys):
    from forgather.cli.main import main

    monkeypatch.setenv("FORGATHER_STRICT", "0")  # restored after the test: --strict sets it for child processes
    write_project(tmp_path, PARTS)
    with pytest.warns(TemplateWarning, match="duplicate key 'lr'"):
        assert main(["-p", str(tmp_path), "-t", "c.yaml", "graph"]) == 0
    capsys.readouterr()
    assert main(["--strict", "-p", str(tmp_path), "-t", "c.yaml", "graph"]) == 2
    assert f"error: {tmp_path}/templates/part.yaml:3: duplicate key 'lr'" in capsys.readouterr().err
