"""The node graph: what the YAML stage produces and the config stage consumes.

A graph is the top-level mapping of a config; keys not starting with '.' are targets. Values are plain
YAML data (dict, list, str, int, float, bool, None) and two node types:

    CallNode  a call of an importable target; `kind` fixes what an alias means:
              "singleton": one object, shared by every alias (`!call:` / `!singleton:`)
              "factory":   a new object at every reference (`!factory:`)
              "partial":   functools.partial(target, *args, **kwargs), one partial object (`!partial:`, and
                           the reference Forgather's deprecated `!lambda:`)
              "meta":      one object, target(*args, **kwargs) with the arguments NOT constructed: the
                           target receives their config (`!meta:`), e.g. to generate code from it
              Two reserved argument keys of the reference Forgather are not call arguments:
              `latent_args`   a mapping (usually a `!var` or an alias) constructed at call time and merged
                              over the keyword arguments
              `submodule_searchpath`  directories where a file target (`/path/x.py:Name`) resolves its
                              relative imports (`from .layers import ...`)
    VarNode   a value supplied from outside (`!var`), with an optional default

Identity is meaning: a node object reached twice is the same node (a YAML alias), so its sharing
semantics apply. `!list`, `!dict`, `!tuple` and `!dlist` are singleton calls of list/dict/tuple.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

CallKind = Literal["singleton", "factory", "partial", "meta"]

# Reserved argument keys (the reference's names) and the config keys they become.
LATENT_ARGS = "latent_args"
SEARCHPATH = "submodule_searchpath"


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(eq=False)
class CallNode:
    kind: CallKind
    target: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    line: int | None = None  # line of the rendered YAML where the node starts (1-based)
    latent_args: Any = None  # merged over kwargs when called (LATENT_ARGS); None: none
    searchpath: Any = None  # SEARCHPATH: a list of directories (or a node giving one); None: none


@dataclass(eq=False)
class VarNode:
    name: str
    default: Any = MISSING
    line: int | None = None


@dataclass
class Graph:
    nodes: dict[str, Any]

    @property
    def targets(self) -> list[str]:
        return [key for key in self.nodes if not str(key).startswith(".")]


def children(value: Any) -> list[tuple[str, Any]]:
    """(key, child) pairs of a graph value, in order; CallNode args are keyed `_args_.i`, its latent args
    `_kwargs_` and its search path `_searchpath_` (their config keys)."""
    if isinstance(value, CallNode):
        extra = [(key, child) for key, child in (("_kwargs_", value.latent_args), ("_searchpath_", value.searchpath)) if child is not None]
        return [(f"_args_.{i}", arg) for i, arg in enumerate(value.args)] + list(value.kwargs.items()) + extra
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return [(str(i), item) for i, item in enumerate(value)]
    return []


def walk(*roots: Any) -> Iterator[Any]:
    """Every value reachable from `roots` (their children, and a `!var`'s default), each object once: a node
    aliased in many places is visited once. Depth-first; the order is not the document's."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield value
        if isinstance(value, VarNode):
            stack.append(value.default)
        stack.extend(child for _, child in children(value))
