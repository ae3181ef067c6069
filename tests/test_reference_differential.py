"""Behaviours found by running small inputs through the reference Forgather and through ours side by side.

Each test states what the reference does with a literal input, so that CI (which has no reference checkout)
keeps it: template line syntax the two render alike in corners the other tests leave open, and the graph
differences fixed after the comparison (a `!var` default, a builtin's attribute as a bare target, and a
keyword named like a config key, which the reference passes on and our config cannot say).
"""

from __future__ import annotations

import pytest

from forgather.graph import GraphError, construct, generate_code, load_graph, to_config
from forgather.template import TemplateEnvironment


def render(tmp_path, files: dict[str, str], name: str = "t.yaml") -> str:
    for path, text in files.items():
        (tmp_path / path).write_bytes(text.encode())
    return TemplateEnvironment([str(tmp_path)]).render(name)


def build(text: str, target: str | list[str] | None = None):
    """(constructed, the same built by generated code) for a YAML text."""
    config = to_config(load_graph(text)).config
    namespace: dict = {}
    exec(compile(generate_code(config, target if isinstance(target, str) else None), "<generated>", "exec"), namespace)
    return construct(config, target), namespace["construct"]()


# -- template line syntax ------------------------------------------------------------------------------------


def test_a_separator_on_the_last_line_without_a_newline_is_text(tmp_path):
    assert render(tmp_path, {"t.yaml": "X: 1\n#---- sub ----"}) == "X: 1\n#---- sub ----"


def test_a_sub_template_shadows_a_file_of_its_name_once_its_file_is_loaded(tmp_path):
    files = {"x.yaml": "FILE\n", "t.yaml": "-- include 'x.yaml'\n#---- x.yaml ----\nSUB\n"}
    assert render(tmp_path, files) == "SUB"


def test_a_lone_carriage_return_ends_a_line(tmp_path):
    assert render(tmp_path, {"t.yaml": "a: 1\r-- set x = 2\r== x\r"}) == "a: 1\n2"


def test_a_statement_or_print_on_the_last_line_without_a_newline(tmp_path):
    assert render(tmp_path, {"t.yaml": "a: 1\n-- set x = 1"}) == "a: 1\n"
    assert render(tmp_path, {"t.yaml": "a: 1\n== 5"}) == "a: 1\n5"


def test_dashes_and_hashes_that_are_not_line_syntax_stay_yaml(tmp_path):
    # `--` is a statement only at the start of a line and followed by whitespace; `#--` is a YAML comment.
    source = "a: '-- set x'\nb: -- c\n#-- d\n  ## e\nf: g ## h\n"
    assert render(tmp_path, {"t.yaml": source}) == "a: '-- set x'\nb: -- c\n#-- d\nf: g"


def test_a_tab_indented_header_overrides_the_block_and_a_header_may_have_trailing_spaces(tmp_path):
    files = {"base.yaml": "a:\n\t[v]\n\tx\n[w]   \nb\n", "t.yaml": "-- extends 'base.yaml'\n\t[v]\n\ty\n"}
    assert render(tmp_path, files) == "a:\n\ty\n\nb\n"


def test_line_statements_and_jinja_tags_mix(tmp_path):
    source = "{% set a = 1 %}\nx: {{ a }}\n-- if a\nz: 1\n-- endif\n-- for k in []\nx\n-- else\nempty\n-- endfor\n"
    assert render(tmp_path, {"t.yaml": source}) == "x: 1\nz: 1\nempty\n"


# -- graph ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "b: !var x\na: !var {name: x, default: 1}\n",
    "a: !var {name: x, default: 1}\nb: !var x\n",
])
def test_a_var_takes_the_default_an_occurrence_gives_wherever_it_stands(text):
    # The reference reads each `!var` occurrence's own default: target `a` is 1 even when a `!var x` without
    # one comes first. Ours has one value per variable: the default, whichever occurrence gives it.
    built, generated = build(text, "a")
    assert built == generated == 1
    assert construct(to_config(load_graph(text)).config, ["a", "b"]) == {"a": 1, "b": 1}


def test_a_bare_dotted_target_is_a_builtins_attribute():
    # The reference resolves a target without a colon through `builtins` first: `str.upper` is str.upper.
    text = "a: !call:str.upper [abc]\nb: !call:dict.fromkeys [[x, y], 0]\n"
    built, generated = build(text)
    assert built == generated == {"a": "ABC", "b": {"x": 0, "y": 0}}


@pytest.mark.parametrize("key", ["_args_", "_target_", "_partial_", "_id_", "_recursive_"])
def test_a_keyword_named_like_a_config_key_is_an_error_at_its_node(key):
    # The reference passes `{_args_: [1, 2]}` on as a keyword argument; as a config key it would change the
    # call itself (positional arguments, another target, a partial), so ours refuses it, naming it.
    with pytest.raises(GraphError, match=rf"line 2: keyword argument '{key}'.*_name_ are the config's own keys"):
        to_config(load_graph(f"a: 1\nb: !call:builtins:dict {{{key}: 1}}\n"))


_MODEL = """
.define: &layers !factory:graph_helpers:Box@layers
    norm: !call:graph_helpers:Box [norm]
    sizes: [1, 2]
model: !partial:graph_helpers:Box
    width: 8
    layers: *layers
    head: !call:graph_helpers:Box [head]
    extra: {bias: false}
"""


@pytest.mark.parametrize("how", ["construct", "generated code"])
def test_a_partial_builds_a_factory_among_its_arguments_at_every_call(how):
    # The reference's !partial builds its arguments per call: a model partial with `layers: !factory` gives every
    # model its own layers (functools.partial built them once and handed every model the same ones), while the
    # singletons inside (`norm`, `head`) are built once, and plain containers are new at each call.
    model = dict(zip(["construct", "generated code"], build(_MODEL, "model")))[how]
    first, second = model(), model(name="b")
    assert first.kwargs["layers"].serial > first.kwargs["head"].serial  # built by the call, not in advance
    assert first.kwargs["layers"] is not second.kwargs["layers"]
    assert first.kwargs["layers"].kwargs["norm"] is second.kwargs["layers"].kwargs["norm"]
    assert first.kwargs["head"] is second.kwargs["head"]
    assert first.kwargs["extra"] == {"bias": False} and first.kwargs["extra"] is not second.kwargs["extra"]
    assert first.kwargs["layers"].kwargs["sizes"] == [1, 2] and second.kwargs["name"] == "b"
    assert list(first.kwargs) == ["width", "layers", "head", "extra"]  # the config's order


def test_a_fresh_partial_shows_its_fixed_arguments_and_checks_keyword_names():
    model, _ = build(_MODEL, "model")
    assert model.keywords["width"] == 8 and "layers" not in model.keywords  # built once; the layers at each call
    with pytest.raises(Exception, match="no parameter 'layrs'"):
        build("m: !partial:builtins:divmod {layrs: !factory:graph_helpers:Box []}\n", "m")


def test_a_fresh_partial_pickles_and_its_copy_still_builds_per_call():
    import pickle

    model, _ = build(_MODEL, "model")
    copy = pickle.loads(pickle.dumps(model))
    first, second = copy(), copy()
    assert first.kwargs["layers"] is not second.kwargs["layers"] and first.kwargs["head"] is second.kwargs["head"]


def test_a_fresh_partial_pickles_with_the_singletons_it_names_only():
    # A DataLoader worker or saved hyperparameters would otherwise carry all that the config built.
    import pickle

    text = _MODEL + "big: !call:builtins:bytes@big [2000000]\n"  # named: its construction remembers it
    config = to_config(load_graph(text)).config
    built = construct(config, ["model", "big"])
    assert len(pickle.dumps(built["big"])) > 2_000_000 and len(pickle.dumps(built["model"])) < 20_000
