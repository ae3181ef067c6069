"""Construct: OmegaConf config -> Python objects. The one instantiate of the project.

Semantics of a `_target_` node (see config.py for the vocabulary):
    plain              target(*_args_, **kwargs), one object per node; nodes with the same `_id_` are one
                       object (the first construction is memoized under the id)
    _partial_: true    functools.partial(target, *_args_, **kwargs), memoized by `_id_` likewise; an argument
                       holding a factory (config.holds_factory) is built again at every call (FreshPartial)
    _factory_: true    a new object at every occurrence, `_id_` notwithstanding
    _meta_: true       target(*_args_, **kwargs) with the arguments as config (plain dicts and lists with
                       `_target_` nodes, interpolations resolved), not constructed; memoized like plain
    _kwargs_           a mapping, constructed and merged over the keyword arguments (later wins)
    _searchpath_       directories where a file target (`/x/model.py:Name`) resolves its relative imports
Arguments are constructed first, depth first. Interpolations are resolved by OmegaConf before anything
is built; a value still missing (`???`) is an error naming its key. A failure names the config path of
the node that failed and its target; `ConstructError.path` lets a caller map it back to a template line,
and the runner name the overrides behind it (forgather.overrides.naming_overrides adds them as a note).
Plain Hydra configs (`_target_` in Hydra's dotted form, `_args_`, `_partial_`) construct the same way.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError, MissingMandatoryValue

from forgather.errors import UserError, did_you_mean
from forgather.graph.annotations import mismatch, parameters_of
from forgather.graph.config import RESERVED_KEYS, holds_factory
from forgather.graph.imports import import_spec

# Hydra keys we accept and ignore: our construction always recurses and returns Python objects.
_IGNORED_HYDRA_KEYS = ("_recursive_", "_convert_")


class ConstructError(UserError):
    """Constructing the node at `path` failed; the message says where, what, and the cause."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def _resolved(config: DictConfig, key: str | None) -> Any:
    """Plain Python data of `config[key]` (or the whole config), every interpolation resolved."""
    try:
        value = config if key is None else config[key]
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except (MissingMandatoryValue, InterpolationToMissingValueError) as error:
        named = re.search(r"Missing mandatory value: ([\w.]+)", str(error.msg))
        missing = named.group(1) if named else error.full_key or key
        where = error.full_key or missing
        raise ConstructError(where, f"no value given for {missing!r}: set it on the command line ({missing}=...)") from error
    except InterpolationResolutionError as error:
        raise ConstructError(error.full_key or key or "", f"cannot resolve an interpolation: {error.msg}") from error


class _Builder:
    def __init__(self, base_dir: str | None):
        self.base_dir = base_dir
        self.memo: dict[str, Any] = {}

    def build(self, value: Any, path: str) -> Any:
        if isinstance(value, Mapping):
            if "_target_" in value:
                return self.call(value, path)
            return {key: self.build(item, _join(path, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [self.build(item, _join(path, str(i))) for i, item in enumerate(value)]
        return value

    def call(self, node: Mapping[str, Any], path: str) -> Any:
        node_id = node.get("_id_")
        factory = bool(node.get("_factory_"))
        if node_id is not None and not factory and node_id in self.memo:
            return self.memo[node_id]
        target = node["_target_"]
        searchpath = self.build(node["_searchpath_"], _join(path, "_searchpath_")) if "_searchpath_" in node else None
        try:
            function = import_spec(target, self.base_dir, searchpath) if isinstance(target, str) else target
        except ImportError as error:
            raise ConstructError(path, f"cannot import target: {error}") from error
        if not callable(function):  # as the reference: checked before the call, partials too
            raise ConstructError(path, f"target {target!r} is a {type(function).__name__}, not a callable; name a class "
                                       f"or a function (module:Name)")
        positional = node.get("_args_", ())
        if not isinstance(positional, (list, tuple)):
            raise ConstructError(
                _join(path, "_args_"), f"_args_ must be a list of positional arguments, got {type(positional).__name__} {positional!r}"
            )
        named = {key: item for key, item in node.items() if key not in RESERVED_KEYS and key not in _IGNORED_HYDRA_KEYS}
        if node.get("_partial_") and any(map(holds_factory, [*positional, *named.values(), node.get("_kwargs_")])):
            result = self.fresh_partial(function, target, positional, named, node.get("_kwargs_"), path)
            if node_id is not None:
                self.memo[node_id] = result
            return result
        # A meta call takes its arguments' config as they are.
        build = (lambda item, _: item) if node.get("_meta_") else self.build
        args = [build(arg, _join(path, f"_args_.{i}")) for i, arg in enumerate(positional)]
        kwargs = {key: build(item, _join(path, key)) for key, item in named.items()}
        if node.get("_kwargs_") is not None:
            kwargs.update(self.latent(node["_kwargs_"], path))
        if not node.get("_meta_"):
            _check_keywords(function, target, kwargs, path)
        if node.get("_partial_"):
            result = functools.partial(function, *args, **kwargs)
        else:
            try:
                result = function(*args, **kwargs)
            except ConstructError:
                raise
            except Exception as error:
                where = _user_frame(error)
                raise ConstructError(path, f"{target}(...) raised {type(error).__name__}: {error}"
                                           + (f" (at {where})" if where else "")) from error
        if node_id is not None and not factory:
            self.memo[node_id] = result
        return result


    def latent(self, config: Any, path: str) -> Mapping[str, Any]:
        extra = self.build(config, _join(path, "_kwargs_"))
        if not isinstance(extra, Mapping):
            raise ConstructError(_join(path, "_kwargs_"), f"latent args must construct to a mapping of keyword arguments, not {type(extra).__name__}")
        return extra

    def fresh_partial(self, function: Any, target: Any, positional: list, named: dict[str, Any], latent: Any, path: str) -> "FreshPartial":
        """A partial holding a factory, built as the reference builds a `!partial`'s arguments at every call: its
        arguments that hold a factory, and its plain lists and mappings, are kept as config and built at each
        call by this builder, so the singletons among them (which carry an `_id_`: config.py) are shared by the
        calls; the others (scalars, singletons) are built now. Positional arguments from the first renewed one
        on are all kept for the call."""
        def renewed(value: Any) -> bool:
            return holds_factory(value) or isinstance(value, list) or (isinstance(value, Mapping) and "_target_" not in value)

        first = next((i for i, arg in enumerate(positional) if renewed(arg)), len(positional))
        args = [self.build(arg, _join(path, f"_args_.{i}")) for i, arg in enumerate(positional[:first])]
        tail = [(arg, _join(path, f"_args_.{i}")) for i, arg in enumerate(positional) if i >= first]
        fresh_latent = latent is not None and renewed(latent)
        fixed = {key: self.build(item, _join(path, key)) for key, item in named.items() if not renewed(item)}
        if latent is not None and not fresh_latent:
            fixed.update(self.latent(latent, path))  # latent args win over keywords, renewed ones too
        fresh = {key: (item, _join(path, key)) for key, item in named.items() if renewed(item) and key not in fixed}
        _check_keywords(function, target, fixed, path, unbuilt=list(fresh))
        result = FreshPartial(function, *args, **fixed)
        # Attributes, not a closure, so that the partial pickles (a DataLoader worker, saved hyperparameters).
        result.builder, result.tail, result.fresh = self, tail, fresh
        result.latent = (latent, path) if fresh_latent else None
        result.order = list(dict.fromkeys([*named, *fixed]))  # the config's order of keywords, latent ones last
        return result


class FreshPartial(functools.partial):
    """A `!partial` holding a `!factory`, whose arguments are built anew at every call as the reference Forgather
    builds a `!partial`'s: a model partial holding `layer_stack: !factory:...` gives every model its own layers,
    where functools.partial would hand every call one stack built in advance. `args` and `keywords` hold the
    arguments built once (scalars, singletons); `fresh_arguments()` builds the positional ones to follow `args`,
    and gives every keyword, in the config's order."""

    builder: _Builder
    tail: list[tuple[Any, str]]  # (config, path) of the positional arguments built at each call
    fresh: dict[str, tuple[Any, str]]  # keyword -> (config, path), built at each call
    latent: tuple[Any, str] | None  # latent args built at each call: (config, the node's path)
    order: list[str]

    def fresh_arguments(self) -> tuple[list[Any], dict[str, Any]]:
        built = {key: self.builder.build(item, where) for key, (item, where) in self.fresh.items()}
        if self.latent is not None:
            built.update(self.builder.latent(*self.latent))
        merged = {**self.keywords, **built}
        keywords = {key: merged[key] for key in dict.fromkeys([*self.order, *merged])}
        return [self.builder.build(arg, where) for arg, where in self.tail], keywords

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        tail, keywords = self.fresh_arguments()
        return self.func(*self.args, *tail, *args, **{**keywords, **kwargs})

    def __reduce__(self) -> Any:
        # Pickled with the singletons its arguments name only, not all that its construction built (a dataset, a
        # tokenizer): a DataLoader worker or saved hyperparameters would carry them all.
        kind, arguments, (func, args, keywords, attributes) = super().__reduce__()
        configs = [config for config, _ in (*self.tail, *self.fresh.values())] + ([self.latent[0]] if self.latent else [])
        needed = set(_ids_in(configs))
        builder = _Builder(self.builder.base_dir)
        builder.memo = {key: value for key, value in self.builder.memo.items() if key in needed}
        return kind, arguments, (func, args, keywords, {**(attributes or {}), "builder": builder})


def _ids_in(value: Any) -> Iterator[Any]:
    """The `_id_`s of the nodes in a config subtree."""
    if isinstance(value, Mapping):
        if "_id_" in value:
            yield value["_id_"]
        for item in value.values():
            yield from _ids_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _ids_in(item)


def _user_frame(error: BaseException) -> str | None:
    """`file:line in function` of the innermost frame of the error's traceback that is the user's code (a project's
    model source, a script): not Python's library, an installed package or Forgather itself. None if there is none."""
    import sysconfig
    import traceback

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the forgather package
    libraries = {os.path.realpath(sysconfig.get_path(name)) for name in ("stdlib", "purelib", "platlib")}
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.realpath(frame.filename)
        if frame.filename.startswith("<") or path.startswith(ours + os.sep):
            continue
        if any(path.startswith(library + os.sep) for library in libraries):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return None


def _check_keywords(function: Any, target: Any, kwargs: Mapping[str, Any], path: str, unbuilt: list[str] = ()) -> None:
    """A keyword `function` has no parameter for is an error here, at the config's node, with the close names;
    a partial (an optimizer's) would otherwise carry it until Lightning calls it, far from the config. So is a
    value that certainly does not fit its parameter's annotation (annotations.py). Callables whose signature
    cannot be read, or that take **kwargs, are left to fail (or not) when called. `unbuilt` keywords (a fresh
    partial's) are checked by name only."""
    parameters = parameters_of(function)
    if parameters is None:  # builtins and C extensions without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    named = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    for key in [*kwargs, *unbuilt]:
        if key not in named:
            hint = did_you_mean(str(key), named, n=2)
            hint += " " if hint else ""
            raise ConstructError(_join(path, str(key)), f"{target} has no parameter {key!r}; {hint}its parameters: "
                                                       f"{', '.join(named) or 'none'}")
    wrong = mismatch(parameters, getattr(function, "__name__", str(target)), kwargs)
    if wrong:
        raise ConstructError(path, f"{wrong} ({target})")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_target(target: str, config: Any) -> str:
    """What to say of a target the config lacks: the close names first, then every target."""
    names = [str(key) for key in config.keys()]
    hint = did_you_mean(str(target), names)
    return f"no such target; {hint}{' ' if hint else ''}targets are: {', '.join(names)}"

def construct(config: DictConfig | Mapping[str, Any], target: str | list[str] | tuple[str, ...] | None = None,
              base_dir: str | None = None) -> Any:
    """Build one target of a config, or a dict of several (a list of names: one construction, so a node they
    share is one object), or (target=None) a dict of every top-level target.

    `base_dir` anchors `.relative:Name` specs (the project's model source directory).
    """
    if not OmegaConf.is_config(config):
        config = OmegaConf.create(dict(config))
    builder = _Builder(base_dir)
    if target is None:
        data = _resolved(config, None)
        return {key: builder.build(value, key) for key, value in data.items() if not str(key).startswith("_")}
    for name in [target] if isinstance(target, str) else target:
        if name not in config.keys():  # (`in` is False for a key whose value is missing)
            raise ConstructError(name, unknown_target(name, config))
    if isinstance(target, str):
        return builder.build(_resolved(config, target), target)
    return {name: builder.build(_resolved(config, name), name) for name in target}


def fold_scalar_calls(tree: Any, base_dir: str | None = None) -> Any:
    """A copy of a config tree where every call of a plain function that yields a scalar (`len(tokenizer)`,
    `floordiv(hidden, heads)`) is replaced by its value; classes and partials are kept as nodes.

    Used where a config subtree must stand alone: a model's tree exported without its tokenizer. One builder
    serves the whole tree, so a singleton two folded calls share (by `_id_`) is built once.
    """
    builder = _Builder(base_dir)

    def fold(node: Any) -> Any:
        if isinstance(node, list):
            return [fold(item) for item in node]
        if not isinstance(node, Mapping):
            return node
        if "_target_" in node and not node.get("_partial_") and not node.get("_factory_"):
            if not inspect.isclass(import_spec(node["_target_"], base_dir)):
                value = builder.build(dict(node), "")
                if isinstance(value, (bool, int, float, str)):
                    return value
        return {key: fold(value) for key, value in node.items()}

    return fold(OmegaConf.to_container(tree, resolve=True) if OmegaConf.is_config(tree) else tree)
