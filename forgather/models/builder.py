"""Instantiate a model config tree in Forgather's config vocabulary, with nothing but the standard library.

A node is a dict with `_target_` (an import spec), optional `_args_` (positional list), `_partial_: true`
(functools.partial instead of a call), `_factory_: true` (a new object at every reference: the default here)
and `_id_` (one shared object for every node with that id), `_kwargs_` (a mapping merged over the keyword
arguments: the reference's `latent_args`); other keys are keyword arguments. `_meta_` and `_searchpath_`
nodes need the full constructor (forgather.graph.construct): a model config holding one is refused. Dicts without
`_target_` and lists are walked; everything else is a literal. `resolve(spec)` turns a target into an object.
This file is inlined into generated standalone model code, so it must not import anything but stdlib.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

RESERVED_KEYS = ("_target_", "_args_", "_partial_", "_factory_", "_id_", "_kwargs_")
_UNSUPPORTED_KEYS = ("_meta_", "_searchpath_")


def instantiate(node: Any, resolve: Callable[[str], Any], shared: dict | None = None) -> Any:
    """Build the objects a config tree describes; nodes with the same `_id_` yield one shared object."""
    shared = {} if shared is None else shared
    if isinstance(node, list):
        return [instantiate(item, resolve, shared) for item in node]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {key: instantiate(value, resolve, shared) for key, value in node.items()}
    node_id = node.get("_id_")
    if node_id is not None and node_id in shared:
        return shared[node_id]
    unsupported = [key for key in _UNSUPPORTED_KEYS if key in node]
    if unsupported:
        raise ValueError(f"{node['_target_']}: {unsupported[0]} is not supported in an exported model's config")
    target = resolve(node["_target_"])
    args = [instantiate(arg, resolve, shared) for arg in node.get("_args_", [])]
    kwargs = {key: instantiate(value, resolve, shared) for key, value in node.items() if key not in RESERVED_KEYS}
    kwargs.update(instantiate(node.get("_kwargs_", {}), resolve, shared))
    built = functools.partial(target, *args, **kwargs) if node.get("_partial_") else target(*args, **kwargs)
    if node_id is not None:
        shared[node_id] = built
    return built
