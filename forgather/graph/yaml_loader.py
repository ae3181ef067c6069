"""YAML -> node graph: a PyYAML loader that knows Forgather's tags.

    !call:SPEC / !singleton:SPEC   CallNode(kind="singleton")
    !factory:SPEC                  CallNode(kind="factory")
    !partial:SPEC / !lambda:SPEC   CallNode(kind="partial") (`!lambda:` is the reference's old name)
    !meta:SPEC                     CallNode(kind="meta"): called with its arguments' config, unconstructed
    !list / !tuple / !dict         singleton calls of list / tuple / dict on the value
    !dlist                         a mapping resolving to the list of its values; redeclaring a key
                                   overrides it in place, a null value erases it
    !var "name" | !var {name, default}
Any tag may end in `@name` (or `:@name`), naming the node. Arguments of a call are a sequence
(positional), a mapping (keywords; keys `arg0`, `arg1` ... are positional), or `{args: [...], kwargs: {...}}`.
The keywords `latent_args` and `submodule_searchpath` are reserved (see nodes.py), not call arguments.
A collection tag on an empty value (`!dict`, `!list`, `!tuple`, `!dlist` alone) is an empty collection.

Loading errors are `GraphError`s carrying the line of the rendered YAML, which the caller maps back to a
template line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from forgather.graph.nodes import LATENT_ARGS, MISSING, SEARCHPATH, CallKind, CallNode, Graph, VarNode

_CALL_TAGS: dict[str, CallKind] = {
    "!call:": "singleton",
    "!singleton:": "singleton",
    "!factory:": "factory",
    "!partial:": "partial",
    "!lambda:": "partial",
    "!meta:": "meta",
}
_COLLECTIONS = {"!list": "list", "!tuple": "tuple", "!dict": "dict", "!dlist": None}
_POSITIONAL_KEY = re.compile(r"^arg(\d+)$")

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class GraphError(ValueError):
    """A malformed node; `line` is the line of the rendered YAML (1-based) when known."""

    def __init__(self, message: str, line: int | None = None):
        self.message = message
        self.line = line
        super().__init__(message if line is None else f"line {line}: {message}")


def _split_name(suffix: str) -> tuple[str, str | None]:
    """'module:Name@node' -> ('module:Name', 'node'); also accepts the 'module:Name:@node' form."""
    if "@" not in suffix:
        return suffix, None
    spec, _, name = suffix.rpartition("@")
    return spec.rstrip(":"), name or None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _arguments(loader: yaml.Loader, node: yaml.Node) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True), {}
    if isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        if mapping and set(mapping) <= {"args", "kwargs"}:
            return list(mapping.get("args") or []), dict(mapping.get("kwargs") or {})
        positional = sorted((int(m.group(1)), k) for k in mapping if (m := _POSITIONAL_KEY.match(str(k))))
        args = [mapping.pop(key) for _, key in positional]
        if [index for index, _ in positional] != list(range(len(positional))):
            raise GraphError("positional keys must run arg0, arg1, ... without gaps", _line(node))
        bad = [key for key in mapping if not isinstance(key, str)]
        if bad:
            raise GraphError(f"keyword argument names must be strings, got {bad!r}", _line(node))
        return args, mapping
    plain = not node.style  # None or "" (the C parser) for a plain scalar
    if node.value == "" and plain:
        return [], {}
    # The custom tag hid the scalar's implicit type (int, float ...): resolve it as if untagged.
    implicit = loader.resolve(yaml.ScalarNode, node.value, (plain, False))
    return [loader.construct_object(yaml.ScalarNode(implicit, node.value, style=node.style))], {}


def _construct_call(loader: yaml.Loader, suffix: str, node: yaml.Node, kind: CallKind) -> CallNode:
    spec, name = _split_name(suffix)
    if not spec:
        raise GraphError("a call tag needs an import spec, e.g. !call:torch.nn:Linear", _line(node))
    args, kwargs = _arguments(loader, node)
    latent_args = kwargs.pop(LATENT_ARGS, None)
    searchpath = kwargs.pop(SEARCHPATH, None)
    if searchpath is not None and not isinstance(searchpath, (list, CallNode, VarNode)):
        raise GraphError(f"{SEARCHPATH} takes a list of directories, not {searchpath!r}", _line(node))
    return CallNode(kind, spec, args, kwargs, name=name, line=_line(node), latent_args=latent_args, searchpath=searchpath)


def _is_empty(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.value == "" and not node.style


def _construct_collection(loader: yaml.Loader, tag: str, node: yaml.Node) -> CallNode:
    base, _, suffix = tag.partition("@")
    base = base.rstrip(":")
    name = suffix or None
    if _is_empty(node):
        empty: Any = {} if base == "!dict" else []
        return CallNode("singleton", _COLLECTIONS[base] or "list", [empty], name=name, line=_line(node))
    if base == "!dlist":
        if not isinstance(node, yaml.MappingNode):
            raise GraphError("!dlist takes a mapping (name: item), a null item erases it", _line(node))
        items = [v for v in loader.construct_mapping(node, deep=True).values() if v is not None]
        return CallNode("singleton", "list", [items], name=name, line=_line(node))
    if base == "!dict":
        if not isinstance(node, yaml.MappingNode):
            raise GraphError("!dict takes a mapping", _line(node))
        return CallNode("singleton", "dict", [loader.construct_mapping(node, deep=True)], name=name, line=_line(node))
    if not isinstance(node, yaml.SequenceNode):
        raise GraphError(f"{base} takes a sequence", _line(node))
    return CallNode("singleton", _COLLECTIONS[base], [loader.construct_sequence(node, deep=True)], name=name, line=_line(node))


def _construct_var(loader: yaml.Loader, node: yaml.Node) -> VarNode:
    if isinstance(node, yaml.ScalarNode):
        return VarNode(loader.construct_scalar(node), line=_line(node))
    if isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        if "name" not in mapping or set(mapping) - {"name", "default"}:
            raise GraphError("!var takes a name, or a mapping {name: ..., default: ...}", _line(node))
        return VarNode(mapping["name"], mapping.get("default", MISSING), line=_line(node))
    raise GraphError("!var takes a name, or a mapping {name: ..., default: ...}", _line(node))


class GraphLoader(_BaseLoader):
    """SafeLoader plus Forgather's tags. Unknown `!tags` are errors that list the known ones."""


# YAML 1.1 reads `1e-3` as a string (its floats need a dot); ML configs mean a float.
GraphLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _multi(kind: CallKind):
    return lambda loader, suffix, node: _construct_call(loader, suffix, node, kind)


for _prefix, _kind in _CALL_TAGS.items():
    GraphLoader.add_multi_constructor(_prefix, _multi(_kind))
for _tag in _COLLECTIONS:
    GraphLoader.add_multi_constructor(_tag, lambda loader, suffix, node, t=_tag: _construct_collection(loader, t + suffix, node))
GraphLoader.add_constructor("!var", _construct_var)


def _unknown_tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> Any:
    known = ", ".join([*_CALL_TAGS, *_COLLECTIONS, "!var"])
    raise GraphError(f"unknown tag !{suffix}; known tags: {known}", _line(node))


GraphLoader.add_multi_constructor("!", _unknown_tag)


def load_graph(text: str) -> Graph:
    """Parse rendered YAML into a Graph; the top level must be a mapping of targets."""
    try:
        data = yaml.load(text, Loader=GraphLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = " ".join(p for p in (error.context, error.problem) if p)
        raise GraphError(f"YAML syntax error: {problem}", mark.line + 1 if mark else None) from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GraphError(f"the top level of a config must be a mapping of targets, not {type(data).__name__}", 1)
    return Graph(data)
