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
(positional), a mapping (keywords; keys `arg0`, `arg1` ... are positional), `{args: [...], kwargs: {...}}`
(either alone too; a null `args` or `kwargs` is an ordinary keyword, as in the reference), or a scalar (the one
positional argument). The keywords `latent_args` and `submodule_searchpath` are reserved (see nodes.py), not
call arguments. An empty scalar, quoted or not, is no arguments for a call tag and an empty collection for a
collection tag (`!dict`, `!list`, `!tuple`, `!dlist` alone, or on `''`).

A key repeated in one mapping (except `.`-keys, which only carry anchors, and `!dlist` items) is a warning,
an error in strict mode (see load_graph). Refused, before anything is built: an anchor whose content
aliases itself, nesting deeper than MAX_DEPTH, one `!var` name with two different defaults, and `{args, kwargs}` of the wrong types. Loading errors are
`GraphError`s carrying the line of the rendered YAML, which the caller maps back to a template line.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import yaml

from forgather.errors import UserError, did_you_mean, strict_mode
from forgather.graph.nodes import LATENT_ARGS, MISSING, SEARCHPATH, CallKind, CallNode, Graph, VarNode, walk

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


Where = Callable[[int], str]


def _rendered_line(line: int) -> str:
    return f"line {line}"


class GraphWarning(UserWarning):
    """A graph that loads but says something the author likely did not mean (a repeated key)."""


class GraphError(UserError, ValueError):
    """A malformed node; `line` is the line of the rendered YAML (1-based) when known.

    A message that names a second place (a duplicate key's first occurrence) is a function of `where`,
    which turns a rendered-YAML line into a place; `describe(where)` lets the caller name template lines."""

    def __init__(self, message: str | Callable[[Where], str], line: int | None = None, other_line: int | None = None):
        self._message = message
        self.line = line
        self.other_line = other_line  # the second place a message names (a duplicate key's first occurrence)
        super().__init__(self.message if line is None else f"line {line}: {self.message}")

    def describe(self, where: Where) -> str:
        return self._message(where) if callable(self._message) else self._message

    @property
    def message(self) -> str:
        return self.describe(_rendered_line)


def _split_name(suffix: str) -> tuple[str, str | None]:
    """'module:Name@node' -> ('module:Name', 'node'); also accepts the 'module:Name:@node' form. The first
    '@' splits, as in the reference: a name may contain '@', a spec may not."""
    if "@" not in suffix:
        return suffix, None
    spec, _, name = suffix.partition("@")
    return spec.rstrip(":"), name or None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _arguments(loader: yaml.Loader, node: yaml.Node) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True), {}
    if isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        if mapping and set(mapping) <= {"args", "kwargs"} and None not in mapping.values():
            return _args_kwargs(mapping, _line(node))
        # argN keys are positional arguments in the order of N; gaps are allowed, as in the reference (its
        # templates leave room between them so that an extending template can add or override one).
        positional = sorted((int(m.group(1)), k) for k in mapping if (m := _POSITIONAL_KEY.match(str(k))))
        args = [mapping.pop(key) for _, key in positional]
        bad = [key for key in mapping if not isinstance(key, str)]
        if bad:
            raise GraphError(f"keyword argument names must be strings, got {bad!r}", _line(node))
        return args, mapping
    if _is_empty(node):
        return [], {}
    plain = not node.style  # None or "" (the C parser) for a plain scalar
    # The custom tag hid the scalar's implicit type (int, float ...): resolve it as if untagged.
    implicit = loader.resolve(yaml.ScalarNode, node.value, (plain, False))
    return [loader.construct_object(yaml.ScalarNode(implicit, node.value, style=node.style))], {}


def _args_kwargs(mapping: dict[str, Any], line: int) -> tuple[list[Any], dict[str, Any]]:
    """The `{args: [...], kwargs: {...}}` form (a keyword argument named `args` goes inside kwargs)."""
    args, kwargs = mapping.get("args", []), mapping.get("kwargs", {})
    if not isinstance(args, (list, tuple)):
        raise GraphError(f"args must be a list of positional arguments, got {type(args).__name__} {args!r}; write args: [{args!r}]", line)
    if not isinstance(kwargs, dict):
        raise GraphError(f"kwargs must be a mapping of keyword arguments, got {type(kwargs).__name__} {kwargs!r}; write kwargs: {{name: value}}", line)
    return list(args), dict(kwargs)


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
    """An empty scalar, quoted or not: the reference reads `!list ''` as `!list` alone."""
    return isinstance(node, yaml.ScalarNode) and node.value == ""


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
        items = loader.construct_mapping(node, deep=True)
        # As in the reference (a !dict is a call of dict), `latent_args` is merged over the items when built.
        latent_args = items.pop(LATENT_ARGS, None)
        return CallNode("singleton", "dict", [items], name=name, line=_line(node), latent_args=latent_args)
    if not isinstance(node, yaml.SequenceNode):
        raise GraphError(f"{base} takes a sequence", _line(node))
    return CallNode("singleton", _COLLECTIONS[base], [loader.construct_sequence(node, deep=True)], name=name, line=_line(node))


_VAR_FORMS = '!var "lr", !var { name: lr, default: 1e-3 } or !var [lr, 1e-3]'


def _construct_var(loader: yaml.Loader, node: yaml.Node) -> VarNode:
    if isinstance(node, yaml.ScalarNode):
        return VarNode(_var_name(loader.construct_scalar(node), node), line=_line(node))
    if isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        if "name" not in mapping or set(mapping) - {"name", "default"}:
            raise GraphError(f"!var takes a name, a mapping {{name: ..., default: ...}} or a list [name, default]: {_VAR_FORMS}", _line(node))
        return VarNode(_var_name(mapping["name"], node), mapping.get("default", MISSING), line=_line(node))
    items = loader.construct_sequence(node, deep=True)
    if len(items) not in (1, 2) or not isinstance(items[0], str):
        raise GraphError(f"!var takes a name, a mapping {{name: ..., default: ...}} or a list [name, default], not {items!r}: {_VAR_FORMS}", _line(node))
    return VarNode(_var_name(items[0], node), items[1] if len(items) == 2 else MISSING, line=_line(node))


def _var_name(name: object, node: yaml.Node) -> str:
    """A variable's name: a config key, which the config refers to as ${name}."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w\-]*", name):
        given = "no name" if name in ("", None) else f"the name {name!r}"
        raise GraphError(f"!var with {given}: a variable's name is a config key (letters, digits, _ and -): {_VAR_FORMS}", _line(node))
    return name


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
    tags = [*_CALL_TAGS, *_COLLECTIONS, "!var"]
    written = "!" + suffix.split(":", 1)[0] + (":" if ":" in suffix else "")
    hint = did_you_mean(written, tags, n=1, show=str)
    hint += " " if hint else ""
    raise GraphError(f"unknown tag !{suffix}; {hint}known tags: {', '.join(tags)}", _line(node))


GraphLoader.add_multi_constructor("!", _unknown_tag)


# Deeper than any real config; guards the recursive composer and constructor (a RecursionError, or a
# crash in libyaml's composer, at a few thousand levels).
MAX_DEPTH = 100


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream, before anything recursive runs."""
    depth = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise GraphError(f"nesting deeper than {MAX_DEPTH} levels; flatten the structure", event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_nodes(root: yaml.Node, duplicate: Callable[[GraphError], None]) -> None:
    """Refuse a recursive alias (an anchor whose content refers to itself); hand each duplicate mapping key to
    `duplicate`.
    Iterative depth-first walk; a node entered but not yet left is on the current path, so meeting it
    again is a cycle. Aliases that merely share a node are fine and are walked once."""
    state: dict[int, bool] = {}  # id -> left (False while on the current path)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            state[id(node)] = True
            continue
        if id(node) in state:
            if not state[id(node)]:
                raise GraphError("this anchor's content refers to itself (a recursive alias); a node cannot contain itself", _line(node))
            continue
        state[id(node)] = False
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            if not node.tag.startswith("!dlist"):  # in a !dlist, redeclaring a key overrides it
                _check_duplicate_keys(node, duplicate)
            stack.extend((child, False) for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, False) for child in node.value)


def _check_duplicate_keys(node: yaml.MappingNode, duplicate: Callable[[GraphError], None]) -> None:
    first: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        # `.define: &name ...` may repeat: a dot key only carries anchors, its value is never read.
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge" or key.value.startswith("."):
            continue
        seen = first.setdefault((key.tag, key.value), _line(key))
        if seen != _line(key):
            duplicate(
                GraphError(
                    lambda where, name=key.value, line=seen: f"duplicate key {name!r} (also at {where(line)}): the last one wins; keep one",
                    _line(key),
                    seen,
                )
            )


def _check_vars(data: Any) -> None:
    """The same `!var` with two different defaults is an error naming both places."""
    defaults: dict[str, VarNode] = {}
    for value in walk(data):
        if isinstance(value, VarNode):
            other = defaults.setdefault(value.name, value) if value.default is not MISSING else None
            if other is not None and other is not value and _plain(other.default) and _plain(value.default) and other.default != value.default:
                first, later = sorted((other, value), key=lambda var: var.line or 0)
                raise GraphError(
                    lambda where: f"!var {later.name!r} has default {later.default!r} here and {first.default!r} at {where(first.line)}; give every !var {later.name} the same default",
                    later.line,
                )


def _plain(value: Any) -> bool:
    """Plain YAML data (no nodes inside), which compares by value."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_plain(item) for item in value.values())
    return not isinstance(value, (CallNode, VarNode))


def _tab_at(text: str, mark: yaml.Mark) -> bool:
    """Whether the error's position is a tab (PyYAML says only "found character that cannot start any token")."""
    lines = text.splitlines()
    return mark.line < len(lines) and lines[mark.line][mark.column:mark.column + 1] == "\t"


def _undefined_alias(text: str, mark: Any, problem: str) -> str:
    """libyaml's "found undefined alias" without the alias: name it, and say how a node gets that name (a
    block replaced without the `&name` of the node it replaced is the usual cause)."""
    line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    found = re.match(r"\*([^\s,\]\}]+)", line[mark.column:])
    if found is None:
        return problem
    name = found.group(1)
    return (f"found undefined alias *{name}: no node above it is named {name} ; name the node it means "
            f"(`&{name}` before its tag, as in `.define: &{name} !partial:...`), or keep that name in the block "
            f"that replaced it")


def load_graph(text: str, strict: bool | None = None, warn: Callable[[GraphError], None] | None = None) -> Graph:
    """Parse rendered YAML into a Graph; the top level must be a mapping of targets.

    A key repeated in one mapping is legal YAML (the last one wins) and the reference Forgather's templates
    use it to override a key they inherit, so by default it is handed to `warn` (default: a GraphWarning);
    under strict mode (`strict`, default forgather.errors.strict_mode()) it is an error."""
    strict = strict_mode() if strict is None else strict

    def duplicate(error: GraphError) -> None:
        if strict:
            raise error
        if warn is not None:
            warn(error)
        else:
            warnings.warn(str(error), GraphWarning, stacklevel=3)

    try:
        _check_depth(text)
        loader = GraphLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                _check_nodes(root, duplicate)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = " ".join(p for p in (error.context, error.problem) if p)
        if "undefined alias" in problem and mark is not None:
            problem = _undefined_alias(text, mark, problem)
        elif mark is not None and _tab_at(text, mark):
            problem = "a tab character where YAML reads indentation or a token; indent with spaces"
        raise GraphError(f"YAML syntax error: {problem}", mark.line + 1 if mark else None) from error
    _check_vars(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GraphError(f"the top level of a config must be a mapping of targets, not {type(data).__name__}", 1)
    return Graph(data)
