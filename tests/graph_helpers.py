"""Objects for graph tests: a call target with identity, and the reference semantics of a graph."""

from __future__ import annotations

import functools
import itertools
import types
from typing import Any

from forgather.graph.construct import FreshPartial
from forgather.graph.imports import import_spec
from forgather.graph.nodes import MISSING, CallNode, Graph, VarNode

BOX_SPEC = "graph_helpers:Box"  # tests/ is on sys.path under pytest
_serial = itertools.count()


class Box:
    """Records its arguments; every instance is distinct, so sharing is visible."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.serial = args, kwargs, next(_serial)


def reference_construct(graph: Graph, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The meaning of a graph, straight from the nodes (the oracle the config path is tested against)."""
    memo: dict[int, Any] = {}
    variables = variables or {}

    def build(value: Any) -> Any:
        if isinstance(value, VarNode):
            return variables.get(value.name, value.default)
        if isinstance(value, CallNode):
            if value.kind != "factory" and id(value) in memo:
                return memo[id(value)]
            function = import_spec(value.target)
            if value.kind == "partial" and any(map(has_factory, [*value.args, *value.kwargs.values()])):
                # The reference's !partial builds its arguments at every call: factories and containers anew.
                def call(*more, node=value, function=function, **extra):
                    return function(*[build(a) for a in node.args], *more, **{k: build(v) for k, v in node.kwargs.items()}, **extra)
                memo[id(value)] = call
                return call
            args = [build(a) for a in value.args]
            kwargs = {k: build(v) for k, v in value.kwargs.items()}
            result = functools.partial(function, *args, **kwargs) if value.kind == "partial" else function(*args, **kwargs)
            if value.kind != "factory":
                memo[id(value)] = result
            return result
        if isinstance(value, dict):  # a plain container is a new one at every use, as in the reference
            return {k: build(v) for k, v in value.items()}
        if isinstance(value, list):
            return [build(v) for v in value]
        return value

    assert all(v is not MISSING for v in variables.values())
    return {key: build(graph.nodes[key]) for key in graph.targets}


def has_factory(value: Any) -> bool:
    """A factory call is made when `value` is built (it is one, or a list or mapping holding one)."""
    if isinstance(value, CallNode):
        return value.kind == "factory"
    if isinstance(value, dict):
        return any(map(has_factory, value.values()))
    return isinstance(value, list) and any(map(has_factory, value))


def shape(value: Any) -> Any:
    """A comparable picture of an object graph: types, values, and which objects are the same object."""
    seen: dict[int, int] = {}
    alive: list[Any] = []  # what a call made stays alive, so no later object takes its id

    def walk(obj: Any) -> Any:
        alive.append(obj)
        if isinstance(obj, (Box, functools.partial, types.FunctionType, list, dict, tuple)) and not isinstance(obj, tuple):
            if id(obj) in seen:
                return ("same-as", seen[id(obj)])
            seen[id(obj)] = len(seen)
        if isinstance(obj, Box):
            return ("Box", [walk(a) for a in obj.args], {k: walk(v) for k, v in obj.kwargs.items()})
        if isinstance(obj, (FreshPartial, types.FunctionType)):  # a partial that builds arguments per call: call it twice
            return ("called", walk(obj()), walk(obj()))
        if isinstance(obj, functools.partial):
            return ("partial", getattr(obj.func, "__name__", obj.func), [walk(a) for a in obj.args], {k: walk(v) for k, v in obj.keywords.items()})
        if isinstance(obj, dict):
            return ("dict", {k: walk(v) for k, v in obj.items()})
        if isinstance(obj, (list, tuple)):
            return (type(obj).__name__, [walk(v) for v in obj])
        return obj

    return walk(value)


def takes_any(**kwargs):
    """A callable taking any keyword (the construct-time keyword check leaves it alone)."""
    return kwargs
