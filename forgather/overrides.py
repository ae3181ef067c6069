"""Command-line overrides, in Hydra's grammar (parsed by hydra-core's own parser), applied to our config.

    group=option      pick GROUP/OPTION.yaml for a group the templates include (`optimizer=adafactor`);
                      `+experiment=NAME` picks the experiment. Group choices are template variables.
    a.b=v             change an existing value (an unknown key is an error with close-match suggestions;
                      a value of the wrong type for the key is an error too)
    +a.b=v            add a key that does not exist yet
    ++a.b=v           set a key either way
    ~a.b              delete a key
Sweeps (`-m`): `a=1,2`, `a=range(1,4)`, `a=choice(x,y)`, `group=glob(ada*)` expand into the cartesian
product of single runs, in command-line order.

A group is a directory of YAML templates on the search path; its options are the file names.
This module never imports torch.
"""

from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class OverrideError(ValueError):
    """A bad override: the message names it and says what would be valid."""


@dataclass(frozen=True)
class Override:
    """One parsed override with a single value (sweeps are expanded before this)."""

    kind: str  # "change", "add", "force_add", "delete"
    key: str
    value: Any
    text: str


_KINDS = {"CHANGE": "change", "ADD": "add", "FORCE_ADD": "force_add", "DEL": "delete"}


def find_groups(search_path: list[str]) -> dict[str, list[str]]:
    """Groups on the search path: every directory (at any depth) holding .yaml files, by relative path."""
    groups: dict[str, set[str]] = {}
    for root in search_path:
        for parent, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            options = {os.path.splitext(f)[0] for f in files if f.endswith(".yaml")}
            group = os.path.relpath(parent, root)
            if options and group != ".":
                groups.setdefault(group.replace(os.sep, "/"), set()).update(options)
    return {group: sorted(options) for group, options in sorted(groups.items())}


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def parse(arguments: list[str], groups: dict[str, list[str]], multirun: bool) -> list[list[Override]]:
    """Parse overrides; returns one list of single-valued overrides per run (one run unless sweeping)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(arguments))
    except HydraException as error:
        raise OverrideError(f"cannot parse overrides: {error}") from error
    axes: list[list[Override]] = []
    for item in parsed:
        kind = _KINDS[item.type.name]
        key = item.key_or_group
        if item.package:
            raise OverrideError(f"{item.input_line}: packages (@) are not supported")
        if item.is_sweep_override():
            if not multirun:
                raise OverrideError(f"{item.input_line} sweeps over several values: add -m to run them all")
            values = _sweep_values(item, groups.get(key))
        else:
            values = [item.value()]
        axes.append([Override(kind, key, value, item.input_line) for value in values])
    return [list(point) for point in itertools.product(*axes)]


def _sweep_values(item, options: list[str] | None) -> list[Any]:
    from hydra.core.override_parser.types import Glob

    value = item.value()
    if isinstance(value, Glob):
        if options is None:
            raise OverrideError(f"{item.input_line}: glob() selects options of a group, and {item.key_or_group!r} is none")
        chosen = value.filter(options)
        if not chosen:
            raise OverrideError(f"{item.input_line} matches no option of group {item.key_or_group!r}: {', '.join(options)}")
        return chosen
    return list(item.sweep_iterator())


def split_choices(overrides: list[Override], groups: dict[str, list[str]]) -> tuple[dict[str, str], list[Override]]:
    """Separate group choices (template variables) from value overrides, validating the choices."""
    choices: dict[str, str] = {}
    values: list[Override] = []
    for override in overrides:
        if override.key not in groups or override.kind == "delete":
            values.append(override)
            continue
        options = groups[override.key]
        option = str(override.value)
        if option not in options:
            raise OverrideError(
                f"{override.text}: no option {option!r} in group {override.key!r}{_suggest(option, options)} "
                f"(options: {', '.join(options)})"
            )
        choices[override.key] = option
    return choices, values


# -- applying value overrides to a config -------------------------------------------------------------


def config_paths(config: DictConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every key in a config (reserved `_x_` keys skipped, interpolations not followed)."""
    paths = []
    items = config.items_ex(resolve=False) if isinstance(config, DictConfig) else enumerate(config)
    for key, _ in items:
        if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            continue
        path = f"{prefix}{key}"
        paths.append(path)
        child = config._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
            paths += config_paths(child, path + ".")
    return paths


def _locate(config: DictConfig, key: str) -> tuple[Any, str | int] | None:
    """(parent node, last key) of `key`, or None where a part is missing. Never follows interpolations."""
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        index: str | int = int(part) if isinstance(node, ListConfig) and part.lstrip("-").isdigit() else part
        if isinstance(node, ListConfig):
            if not isinstance(index, int) or not -len(node) <= index < len(node):
                return None
        elif index not in node:
            return None
        if depth == len(parts) - 1:
            return node, index
        child = node._get_node(index)
        if child._is_interpolation():
            reference = child._value()
            raise OverrideError(
                f"{'.'.join(parts[: depth + 1])} refers to {reference}: override through the referenced key instead "
                f"({reference[2:-1]}.{'.'.join(parts[depth + 1:])}=...)"
            )
        node = child
    return None


def _builds_an_object(node: DictConfig) -> bool:
    """Whether a `_target_` node makes an object (a class, or a partial), rather than computing a value
    (`len(tokenizer)`), which an override may replace by a literal."""
    import inspect

    from forgather.graph.imports import import_spec

    if node.get("_partial_") or node.get("_factory_"):
        return True
    try:
        return inspect.isclass(import_spec(str(node._target_)))
    except ImportError:
        return True


def _check_type(key: str, old: Any, new: Any) -> None:
    if OmegaConf.is_dict(old) and "_target_" in old and not isinstance(new, dict) and _builds_an_object(old):
        raise OverrideError(f"{key} is a component ({old._target_}); override its arguments ({key}.NAME=...) or choose a group option")
    if old is None or isinstance(old, str) or new is None:
        return
    numeric = (int, float)
    if isinstance(old, bool) or isinstance(new, bool):
        compatible = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, numeric):
        compatible = isinstance(new, numeric) and not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    else:
        compatible = True
    if not compatible:
        raise OverrideError(f"{key} is {type(old).__name__} ({old!r}); got {type(new).__name__} {new!r}")


def _named_node_paths(config: DictConfig) -> dict[str, str]:
    """`_id_` -> dotted path of every named node written in place (interpolations not followed)."""
    found: dict[str, str] = {}
    for path in config_paths(config):
        parent, last = _locate(config, path)
        node = parent._get_node(last)
        if isinstance(node, DictConfig) and not node._is_interpolation() and "_id_" in node:
            found[str(node._get_node("_id_")._value())] = path
    return found


def _refuse_adding_beside_a_named_node(config: DictConfig, override: Override) -> None:
    """`++feedforward_factory.x=v` would add a new top-level key that nothing reads when the node named
    feedforward_factory is written where it is used (model.layer_factory.feedforward_factory): say where it is."""
    head, _, rest = override.key.partition(".")
    if not rest or head in config:
        return
    path = _named_node_paths(config).get(head)
    if path is not None:
        raise OverrideError(
            f"{override.text}: the node {head!r} is at {path}; write {'+' if override.kind == 'add' else '++'}{path}.{rest}=..."
        )


def apply(config: DictConfig, overrides: list[Override]) -> None:
    """Apply value overrides in order, in place. Errors name the override and suggest close keys."""
    for override in overrides:
        key = override.key
        found = _locate(config, key)
        if override.kind in ("change", "delete") and found is None:
            raise OverrideError(f"{override.text}: no key {key!r} in the config{_suggest(key, config_paths(config))}")
        if override.kind == "add" and found is not None:
            raise OverrideError(f"{override.text}: {key!r} is already set; write {key}=... to change it (or ++{key}=...)")
        if override.kind in ("add", "force_add") and found is None:
            _refuse_adding_beside_a_named_node(config, override)
        if override.kind == "delete":
            parent, last = found
            del parent[last]
            continue
        if override.kind == "change":
            parent, last = found
            old = parent._get_node(last)
            old_value = old if isinstance(old, (DictConfig, ListConfig)) else (None if old._is_interpolation() else old._value())
            _check_type(key, old_value, override.value)
        OmegaConf.update(config, key, override.value, merge=False, force_add=True)
