"""Node graph -> OmegaConf config, in Hydra's vocabulary plus keys of ours.

    CallNode     {_target_: SPEC, _args_: [...], **kwargs}, with `_partial_: true` for partials,
                 `_factory_: true` for factories, `_meta_: true` for meta calls (arguments passed as
                 config, not constructed), and `_id_` when the node is named or shared; its latent args
                 become `_kwargs_` (a mapping merged over the keyword arguments when it is built) and its
                 submodule search path `_searchpath_`
    VarNode      "${name}", with a top-level `name: default` (or `???` when it has none); the default is
                 the one any occurrence gives, wherever it stands (the reference reads each occurrence's own
                 default, and two different ones are refused at load)
    str          escaped, so that a literal "${" stays literal

A meta call's arguments are data for its target, not nodes to build: they are written out in full (no
interpolation into or out of them), with a `!var` as the literal text "${name}".

A node reached over more than one path is written in full once, at its shallowest occurrence (the canonical
path), and as an interpolation "${canonical.path}" everywhere else; its `_id_` makes construction share
one object. So an override at the canonical path reaches every use, and dumping the config to YAML and
loading it again constructs the same object graph with the same sharing. A plain mapping or list (no tag)
reached through an alias is written once and interpolated too, but, as in the reference Forgather, it is a
new container at each use (OmegaConf resolves each interpolation to a copy): the nodes inside it are shared
as anywhere, so a `!factory` inside is called once per use. `!dict`/`!list` make one shared container.
Mapping keys keep YAML's types (ints, floats, bools: a label map `{0: neg}`). A path through a key that is no
string cannot be interpolated, so a node shared from under one is written in full at each use (its `_id_`
still makes it one object).
A partial's argument that holds a factory (`holds_factory`) is built again at every call of the partial, as
the reference's `!partial` materializes its arguments per call; the singletons among such a partial's
arguments get an `_id_`, so the calls share them (in the reference they are built once as well).
Top-level keys starting with '.' hold definitions, not targets: they live on where they are used and are
not written.

A keyword argument named like the vocabulary's own keys (`_args_`, `_target_`, any `_name_`) is an error at
its node: written as a config key it would change the call instead of reaching the callable (the reference
passes it on; the config cannot say that).

Two different nodes with the same `@name` are an error (a `GraphError` at the second one's line), as in the
reference Forgather: sharing one `_id_`, they would silently become one object.

`to_config` also returns, for every path where a call node occurs, the rendered-YAML line it came from,
so that construction errors can be traced to a template line.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from forgather.graph.imports import anchored
from forgather.graph.nodes import MISSING, CallNode, Graph, VarNode, children, walk
from forgather.graph.yaml_loader import GraphError

RESERVED_KEYS = ("_target_", "_args_", "_partial_", "_factory_", "_meta_", "_kwargs_", "_searchpath_", "_id_")
_VOCABULARY_KEY = re.compile(r"_\w+_")  # Hydra's and ours: _target_, _args_, _recursive_ ...
_SIMPLE_KEY = re.compile(r"^[A-Za-z_][\w-]*$|^\d+$")


@dataclass
class ConfigResult:
    config: DictConfig
    lines: dict[str, int]  # config path of a call node -> line in the rendered YAML


_DOLLAR_BRACE = re.compile(r"(\\*)\$\{")


def escape(text: str) -> str:
    """Keep a literal string literal for OmegaConf, where `${` starts an interpolation: write `\\${`, and
    double the backslashes before it (OmegaConf reads `\\\\` before `${` as one backslash)."""
    return _DOLLAR_BRACE.sub(lambda m: m.group(1) * 2 + "\\${", text)


def _graph_children(value: Any) -> list[tuple[str, Any]]:
    """`children`, less a meta call's arguments (written as data, they share nothing with the graph)."""
    if isinstance(value, CallNode) and value.kind == "meta":
        return [(key, child) for key, child in children(value) if key in ("_kwargs_", "_searchpath_")]
    return children(value)


def holds_factory(value: Any) -> bool:
    """Whether building `value` calls a factory: it is one (a `!factory` node, or a config node with
    `_factory_`), or a plain list or mapping holding one. A call of another kind builds its arguments once,
    whatever they hold, so the search stops there. Such an argument of a partial is built again at every call
    of the partial, as the reference's `!partial` does: a model partial holding `layer_stack: !factory:...`
    gives each model its own layers."""
    if isinstance(value, CallNode):
        return value.kind == "factory"
    if isinstance(value, Mapping):
        if "_target_" in value:
            return bool(value.get("_factory_"))
        return any(holds_factory(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_factory(item) for item in value)
    return False


def _path_counts(graph: Graph) -> Counter:
    """For each node object (call node or container), over how many paths the targets reach it.

    A node reached over two paths (aliased itself, or inside an aliased factory) is shared: apart from
    factories, every node is one object however it is reached. The arguments of a partial that holds a factory
    count as reached twice, since calls of the partial build them again: their singletons are shared by the
    calls. Counted over the DAG in topological order, so deep chains of aliases cost linear time.
    """
    def is_node(value: Any) -> bool:
        return isinstance(value, (CallNode, dict, list))

    def times(value: Any, found: list[Any]) -> int:
        return 2 if isinstance(value, CallNode) and value.kind == "partial" and any(map(holds_factory, found)) else 1

    edges: dict[int, list[tuple[int, int]]] = {}
    objects: dict[int, Any] = {}
    stack = [graph.nodes[key] for key in graph.targets if is_node(graph.nodes[key])]
    while stack:
        value = stack.pop()
        if id(value) in objects:
            continue
        objects[id(value)] = value
        found = [child for _, child in _graph_children(value) if is_node(child)]
        factor = times(value, found)
        edges[id(value)] = [(id(child), factor) for child in found]
        stack.extend(found)
    indegree: Counter = Counter(child for targets in edges.values() for child, _ in targets)
    counts: Counter = Counter(id(graph.nodes[key]) for key in graph.targets if is_node(graph.nodes[key]))
    ready = [key for key in objects if indegree[key] == 0]
    while ready:
        key = ready.pop()
        for child, factor in edges[key]:
            counts[child] += counts[key] * factor
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return counts


def _canonical_paths(graph: Graph) -> dict[int, str | None]:
    """Shallowest occurrence of each node object; breadth-first, so ties go to document order. None where that
    occurrence lies under a mapping key that is no string (`{0: ...}`), which no interpolation can name."""
    paths: dict[int, str | None] = {}
    queue = [(str(key), graph.nodes[key], True) for key in graph.targets]
    while queue:
        following = []
        for path, value, nameable in queue:
            if isinstance(value, (CallNode, dict, list)):
                if id(value) in paths:
                    continue
                paths[id(value)] = path if nameable else None
            following += [(f"{path}.{key}", child, nameable and isinstance(key, str)) for key, child in _graph_children(value)]
        queue = following
    return paths


def _config_key(key: Any) -> Any:
    """A mapping key as the config keeps it: YAML's ints, floats and bools stay so (a label map `{0: neg}`, as in
    the reference); any other key (null) becomes its text, the one key type OmegaConf has beside those."""
    return key if isinstance(key, (str, int, float, bool)) else str(key)


def _referable(path: str) -> bool:
    return all(_SIMPLE_KEY.match(part) for part in path.split("."))


class _Converter:
    def __init__(self, graph: Graph, file_root: str | None = None):
        self.graph = graph
        self.file_root = file_root
        self.shared = {key for key, count in _path_counts(graph).items() if count > 1}
        self.canonical = _canonical_paths(graph)
        self.ids: dict[int, str] = {}
        self.used_ids: set[str] = self._check_names(self._named_nodes())
        self.vars: dict[str, Any] = {}
        self.lines: dict[str, int] = {}

    def _named_nodes(self) -> list[CallNode]:
        return [value for value in walk(*self.graph.nodes.values()) if isinstance(value, CallNode) and value.name]

    @staticmethod
    def _check_names(named: list[CallNode]) -> set[str]:
        """The names in use; two different nodes may not share one (its `_id_` would make them one object)."""
        first: dict[str, CallNode] = {}
        for node in sorted(named, key=lambda n: n.line or 0):
            other = first.setdefault(node.name, node)
            if other is not node:
                raise GraphError(
                    f"a second node is named {node.name!r} (the first is at line {other.line} of the rendered YAML); a name "
                    "stands for one node: refer to the first through its anchor (*alias), or rename one", node.line
                )
        return set(first)

    def _id_for(self, value: CallNode) -> str:
        if id(value) not in self.ids:
            if value.name:
                self.ids[id(value)] = value.name
            else:
                stem = value.target.split(":")[-1].split(".")[-1]
                number = 1
                while f"{stem}_{number}" in self.used_ids:
                    number += 1
                self.ids[id(value)] = f"{stem}_{number}"
                self.used_ids.add(self.ids[id(value)])
        return self.ids[id(value)]

    def convert(self, value: Any, path: str) -> Any:
        key = id(value)
        canonical = self.canonical.get(key)
        if key in self.shared and canonical is not None and canonical != path and _referable(canonical):
            if isinstance(value, CallNode) and value.line is not None:
                self.lines[path] = value.line
            return "${" + canonical + "}"
        if isinstance(value, CallNode):
            return self._call(value, path)
        if isinstance(value, VarNode):
            if self.vars.get(value.name, MISSING) is MISSING:
                self.vars[value.name] = value.default
            return "${" + value.name + "}"
        if isinstance(value, dict):
            return {_config_key(k): self.convert(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.convert(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, str):
            return escape(value)
        return value

    def _call(self, node: CallNode, path: str) -> dict[str, Any]:
        if node.line is not None:
            self.lines[path] = node.line
        out = self._node(node, path, self.convert, self._data if node.kind == "meta" else self.convert)
        if node.name or (id(node) in self.shared and node.kind != "factory"):
            out["_id_"] = self._id_for(node)
        return out

    def _node(self, node: CallNode, path: str, convert, convert_arguments) -> dict[str, Any]:
        target = anchored(node.target, self.file_root) if self.file_root is not None else node.target
        out: dict[str, Any] = {"_target_": target}
        reserved = [name for name in node.kwargs if isinstance(name, str) and _VOCABULARY_KEY.fullmatch(name)]
        if reserved:
            raise GraphError(f"keyword argument {reserved[0]!r} of {node.target}: names of the form _name_ are the config's own "
                             f"keys (_target_, _args_, _partial_ ...); pass positional arguments as a list, or rename it", node.line)
        if node.args:
            out["_args_"] = [convert_arguments(arg, f"{path}._args_.{i}") for i, arg in enumerate(node.args)]
        for name, arg in node.kwargs.items():
            out[name] = convert_arguments(arg, f"{path}.{name}")
        for key, value in (("_kwargs_", node.latent_args), ("_searchpath_", node.searchpath)):
            if value is not None:
                out[key] = convert(value, f"{path}.{key}")
        if node.kind in ("partial", "factory", "meta"):
            out[f"_{node.kind}_"] = True
        return out

    def _data(self, value: Any, path: str = "") -> Any:
        """A meta call's argument, written out in full: nodes in place (named ones with their `_id_`),
        `!var`s as literal "${name}"."""
        if isinstance(value, CallNode):
            out = self._node(value, path, self._data, self._data)
            if value.name:
                out["_id_"] = value.name
            return out
        if isinstance(value, VarNode):
            return escape("${" + value.name + "}")
        if isinstance(value, dict):
            return {_config_key(k): self._data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._data(v) for v in value]
        return escape(value) if isinstance(value, str) else value


def to_config(graph: Graph, file_root: str | None = None) -> ConfigResult:
    """Convert a graph to an OmegaConf DictConfig (see the module docstring for the vocabulary); `file_root`
    (the project directory) anchors the targets' relative file paths (`./src/x.py:Name`)."""
    converter = _Converter(graph, file_root)
    data = {str(key): converter.convert(graph.nodes[key], str(key)) for key in graph.targets}
    for name, default in converter.vars.items():
        # A target that is itself `!var name` holds the value rather than interpolating itself.
        if data.get(name, "${" + name + "}") == "${" + name + "}":
            data[name] = "???" if default is MISSING else converter.convert(default, name)
    return ConfigResult(OmegaConf.create(data), converter.lines)
