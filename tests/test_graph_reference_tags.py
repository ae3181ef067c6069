"""The reference Forgather's tags and reserved keys, through every graph stage: `!lambda:`, `!meta:`, empty
collection tags, `latent_args` and `submodule_searchpath` (graph, OmegaConf config, construct, codegen, dump)."""

from __future__ import annotations

import functools

import pytest
from omegaconf import OmegaConf

from forgather.graph import construct, dump_graph, generate_code, load_graph, to_config
from forgather.graph.yaml_loader import GraphError
from graph_helpers import BOX_SPEC, Box, shape


def stages(text: str, target: str | None = None, base_dir: str | None = None):
    """(constructed, the same built by generated code, config) for a YAML text."""
    config = to_config(load_graph(text)).config
    built = construct(config, target, base_dir=base_dir)
    namespace: dict = {}
    exec(compile(generate_code(config, target, base_dir=base_dir), "<generated>", "exec"), namespace)
    return built, namespace["construct"](), config


def test_lambda_is_the_old_name_of_partial():
    built, generated, config = stages(f"f: !lambda:{BOX_SPEC} {{a: 1}}\n", "f")
    assert isinstance(built, functools.partial) and built(b=2).kwargs == {"a": 1, "b": 2}
    assert config.f._partial_ is True and shape(generated(b=2)) == shape(built(b=2))
    assert "!partial:" in dump_graph(load_graph(f"f: !lambda:{BOX_SPEC} {{a: 1}}\n"))


def test_meta_call_gets_its_arguments_as_config_not_objects():
    text = f"""\
inner: &inner !singleton:{BOX_SPEC}@inner
    size: !var "hidden"
    depth: 2
meta: !meta:{BOX_SPEC}
    obj: *inner
    label: x
"""
    built, generated, config = stages(text, "meta")
    obj = built.kwargs["obj"]
    assert isinstance(built, Box) and not isinstance(obj, Box)
    assert obj == {"_target_": BOX_SPEC, "size": "${hidden}", "depth": 2, "_id_": "inner"}
    assert built.kwargs["label"] == "x" and config.meta._meta_ is True
    assert generated.kwargs == built.kwargs
    # The `!var` inside is data for the meta target: it asks no value of the config.
    assert "hidden" not in config


def test_meta_call_is_one_object_however_often_it_is_aliased():
    built, generated, _ = stages(f"a: &m !meta:{BOX_SPEC} [1]\nb: [*m, *m]\n")
    assert built["b"][0] is built["a"] and built["b"][1] is built["a"]
    assert generated["b"][0] is generated["a"]


@pytest.mark.parametrize(("tag", "empty"), [("!dict", {}), ("!list", []), ("!tuple", ()), ("!dlist", [])])
def test_a_collection_tag_without_a_value_is_an_empty_collection(tag, empty):
    built, generated, _ = stages(f"a: {tag}\nb: 1\n")
    assert built["a"] == empty and type(built["a"]) is type(empty)
    assert generated["a"] == empty and built["b"] == 1


def test_named_empty_dict_is_shared():
    built, _, _ = stages("a: &d !dict:@env\nb: *d\n")
    assert built["a"] == {} and built["b"] is built["a"]


def test_latent_args_are_merged_over_the_keyword_arguments():
    text = f"""\
defaults: &defaults
    attn: sdpa
    width: 4
model: !partial:{BOX_SPEC}
    width: 2
    depth: 3
    latent_args: !var
        name: "model_constructor_args"
        default: *defaults
"""
    built, generated, config = stages(text, "model")
    assert built().kwargs == {"width": 4, "depth": 3, "attn": "sdpa"}
    assert generated().kwargs == built().kwargs
    written = OmegaConf.to_container(config.model)
    assert "latent_args" not in written and written["_kwargs_"] == "${model_constructor_args}"
    config.model_constructor_args = {"attn": "flex"}
    assert construct(config, "model")().kwargs == {"width": 2, "depth": 3, "attn": "flex"}


def test_latent_args_must_construct_to_a_mapping():
    config = to_config(load_graph(f"a: !call:{BOX_SPEC} {{latent_args: [1, 2]}}\n")).config
    with pytest.raises(Exception, match="a._kwargs_: latent args must construct to a mapping"):
        construct(config, "a")


def test_submodule_searchpath_resolves_a_file_targets_relative_imports(tmp_path):
    (tmp_path / "bits").mkdir()
    (tmp_path / "bits" / "layers.py").write_text("def width():\n    return 7\n")
    (tmp_path / "model.py").write_text("from .layers import width\n\n\nclass Model:\n    def __init__(self, depth):\n        self.size = width() * depth\n")
    text = f"""\
searchpath: &searchpath
    - "{tmp_path / 'bits'}"
model: !singleton:{tmp_path / 'model.py'}:Model
    depth: 3
    submodule_searchpath: *searchpath
"""
    built, generated, config = stages(text, "model")
    assert built.size == 21 and generated.size == 21
    assert "submodule_searchpath" not in config.model and "depth" in config.model


def test_submodule_searchpath_must_be_a_list():
    with pytest.raises(GraphError, match="submodule_searchpath takes a list of directories"):
        load_graph(f"a: !call:{BOX_SPEC} {{submodule_searchpath: here}}\n")


def test_reserved_keys_and_meta_survive_a_dump_and_reload():
    text = f"""\
d: &d {{x: 1}}
m: !meta:{BOX_SPEC}@gen [1, {{y: 2}}]
p: !partial:{BOX_SPEC}
    arg0: 5
    k: 1
    latent_args: *d
    submodule_searchpath: ["/nowhere"]
"""
    graph = load_graph(text)
    again = load_graph(dump_graph(graph))
    assert again.nodes["m"].kind == "meta" and again.nodes["m"].name == "gen"
    p = again.nodes["p"]
    assert (p.args, p.kwargs, p.latent_args, p.searchpath) == ([5], {"k": 1}, {"x": 1}, ["/nowhere"])
    assert OmegaConf.to_container(to_config(again).config) == OmegaConf.to_container(to_config(graph).config)


def test_two_different_nodes_may_not_share_a_name():
    graph = load_graph(f"a: !call:{BOX_SPEC}@n [1]\nb: !call:{BOX_SPEC}@n [2]\nc: &x !call:{BOX_SPEC}@m []\nd: *x\n")
    with pytest.raises(GraphError, match="a second node is named 'n' .the first is at line 1") as caught:
        to_config(graph)
    assert caught.value.line == 2


def test_reference_bare_callables_construct_and_generate_the_same():
    # The reference's own bare targets (its CallableNode.BUILT_INS), as its tutorial's project.yaml uses them.
    text = (
        "d: &d !dict { a: 1, b: [1, 2] }\n"
        "item: !call:getitem [ *d, b ]\n"
        "vals: !singleton:values [ *d ]\n"
        "pairs: !call:list [ !call:items [ *d ] ]\n"
        "deferred: !partial:call [ !partial:operator:add [ 1 ] ]\n"
    )
    built, generated, _ = stages(text)
    for result in (built, generated):
        assert result["item"] == [1, 2] and list(result["vals"]) == [1, [1, 2]]
        assert result["pairs"] == [("a", 1), ("b", [1, 2])] and result["deferred"](2) == 3
    assert built["item"] is built["d"]["b"]


def test_a_bare_name_that_is_neither_builtin_nor_reference_callable_says_how_to_import_it():
    config = to_config(load_graph("x: !call:getitm [ {a: 1}, a ]\n")).config
    with pytest.raises(Exception, match="'getitm' is not a builtin; write 'module:getitm'"):
        construct(config, "x")


def test_the_reference_library_is_named_as_such_when_a_target_needs_it():
    config = to_config(load_graph("t: !call:forgather.ml.trainer:Trainer []\n")).config
    with pytest.raises(Exception, match="'forgather.ml' is the reference Forgather's library"):
        construct(config, "t")
    config = to_config(load_graph("c: !partial:forgather.codegen:generate_code []\n")).config
    with pytest.raises(Exception, match="'forgather.codegen' is a module of the reference Forgather"):
        construct(config, "c")


def test_latent_args_of_a_dict_tag_are_merged_over_its_items():
    built, generated, _ = stages("d: !dict {b: 2, a: 0, latent_args: !var {name: extra, default: {a: 1}}}\n", "d")
    assert built == generated == {"b": 2, "a": 1}
