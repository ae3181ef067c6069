"""Code generation: a config -> a Python module whose `construct()` builds the same objects.

The module uses plain imports (`from torch.optim import AdamW`), needs nothing from Forgather, and keeps
construction semantics: a node with an `_id_` becomes a local variable (built once, shared by every
use), a factory with an `_id_` becomes a local function called at every use, a partial is
`functools.partial(...)` (one holding a factory a local function, which builds the factory's arguments at
every call as construct's FreshPartial does), latent args (`_kwargs_`) are `**{...}` after the keyword arguments, and a meta
call gets its arguments' config as literal data. A top-level scalar that other values interpolate (`${lr}`, a `!var`) becomes a
parameter of `construct()` with its value as the default. Files named by path (`/x/y.py:Name`,
`.relative:Name`) are loaded with importlib, since they are no importable module.
"""

from __future__ import annotations

import importlib.util
import keyword
import math
import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from forgather.graph.config import RESERVED_KEYS, holds_factory
from forgather.graph.imports import module_file, split_spec

_REFERENCE = re.compile(r"^\$\{([\w.\-]+)\}$")
_LINE_WIDTH = 100

_FILE_LOADER = '''
def _load_file(path, searchpath=None):
    """Import a Python file by its path (it is not an importable module); its relative imports resolve
    in `searchpath`."""
    import importlib.util
    import sys

    name = "generated_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=searchpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.append(os.path.dirname(path))
    spec.loader.exec_module(module)
    return module
'''


def _absolute(reference: str, path: str) -> str:
    """An interpolation's key as a path from the root: OmegaConf reads `${.x}` in the node holding the value at
    `path`, and each further dot one level up (`${..x}` at `a.b.c` is `a.x`)."""
    dots = len(reference) - len(reference.lstrip("."))
    if not dots:
        return reference
    rest = reference[dots:]
    return ".".join([*path.split(".")[:-dots], *([rest] if rest else [])])


def _is_keyword_name(key: Any) -> bool:
    """Whether `key` can be written as `key=value` in a call."""
    return isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)


def _module_and_attrs(spec: str) -> tuple[str, list[str]]:
    """('module', ['Name', 'attr']) for any importable spec; module '' for builtins."""
    module, qualname = split_spec(spec)
    if module:
        return module, qualname.split(".")
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(candidate) is not None:
                return candidate, parts[cut:]
        except (ImportError, ValueError):
            continue
    return "", parts


class _Generator:
    def __init__(self, config: DictConfig, base_dir: str | None):
        self.config = config
        self.raw = OmegaConf.to_container(config, resolve=False)
        self.base_dir = base_dir
        self.imports: dict[tuple[str, str, tuple[str, ...]], str] = {}  # (module, name, searchpath) -> local symbol
        self.symbols: set[str] = set()
        self.body: list[str] = []
        self.defined: dict[str, str] = {}  # _id_ -> expression that uses it
        self.params: dict[str, Any] = {}
        self.uses_partial = False
        self.uses_files = False
        # A parameter is named before anything else, so that an import or a shared node never takes its name
        # (`len: 5` beside `!call:builtins:len`); a key no Python name can spell (`class`, `my-key`) is renamed.
        self.param_names = {key: self._fresh(key) for key in self._parameter_keys()}
        self.partial = self._fresh("partial")
        self.symbols |= {"os", "_load_file", "construct"}  # the module's own names: an import must not take them

    # -- names ------------------------------------------------------------------------------------------

    def _fresh(self, stem: str) -> str:
        stem = re.sub(r"\W", "_", stem) or "value"
        if stem[0].isdigit() or keyword.iskeyword(stem):
            stem = f"_{stem}"
        name, number = stem, 1
        while name in self.symbols:
            number += 1
            name = f"{stem}_{number}"
        self.symbols.add(name)
        return name

    def _symbol(self, spec: str) -> str:
        module, attrs = _module_and_attrs(spec)
        if not module:
            return ".".join(attrs)
        key = (module, attrs[0], ())
        if key not in self.imports:
            self.imports[key] = self._fresh(attrs[0])
        return ".".join([self.imports[key], *attrs[1:]])

    def _parameter_keys(self) -> list[str]:
        """The top-level keys that become parameters of construct(): scalars a value refers to by name, and
        missing values (`???`)."""
        keys = [key for key, value in self.raw.items() if value == "???"]

        def visit(value: Any, path: str) -> None:
            if isinstance(value, dict):
                for name, item in value.items():
                    visit(item, f"{path}.{name}" if path else str(name))
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    visit(item, f"{path}.{index}")
            elif isinstance(value, str) and (match := _REFERENCE.match(value)):
                key = _absolute(match.group(1), path)
                if "." not in key and key in self.raw and not isinstance(self.raw[key], (dict, list)):
                    keys.append(key)

        visit(self.raw, "")
        return list(dict.fromkeys(str(key) for key in keys))

    # -- values -----------------------------------------------------------------------------------------

    def _lookup(self, path: str) -> Any:
        value: Any = self.raw
        for part in path.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        return value

    def expr(self, value: Any, path: str, indent: int) -> str:
        if isinstance(value, str) and "${" in value:
            return self._interpolation(value, path, indent)
        if isinstance(value, dict):
            if "_target_" in value:
                return self._node(value, path, indent)
            items = [f"{key!r}: {self.expr(item, f'{path}.{key}', indent + 1)}" for key, item in value.items()]
            return self._wrap("{", items, "}", indent)
        if isinstance(value, list):
            items = [self.expr(item, f"{path}.{i}", indent + 1) for i, item in enumerate(value)]
            return self._wrap("[", items, "]", indent)
        if isinstance(value, float) and not math.isfinite(value):
            return f"float({str(value)!r})"
        return repr(value)

    def _interpolation(self, value: str, path: str, indent: int) -> str:
        match = _REFERENCE.match(value)
        if match:
            referenced = _absolute(match.group(1), path)
            target = self._lookup(referenced)
            if "." not in referenced and not isinstance(target, (dict, list)):
                self.params.setdefault(referenced, target)
                return self.param_names[referenced]
            return self.expr(target, referenced, indent)
        return repr(self._select(path))

    def _node(self, node: dict, path: str, indent: int) -> str:
        node_id = node.get("_id_")
        factory = bool(node.get("_factory_"))
        fresh = bool(node.get("_partial_")) and any(self._holds_factory(arg, where) for arg, where in _arguments(node, path))
        if node_id is None and not fresh:
            return self._call(node, path, indent)
        if node_id is None or node_id not in self.defined:
            key = path.rsplit(".", 1)[-1]  # an unnamed partial is called after its key (`causal_model`)
            stem = key if key.isidentifier() and not key.startswith("_") else str(node["_target_"]).split(":")[-1].split(".")[-1]
            name = self._fresh(str(node_id) if node_id is not None else stem)
            if fresh:
                args, kwargs = self._fresh("args"), self._fresh("kwargs")
                call = self._call(node, path, 2, forward=(args, kwargs))
                self.body.append(f"def {name}(*{args}, **{kwargs}):\n        return {call}")
                expression = name
            elif factory:
                self.body.append(f"def {name}():\n        return {self._call(node, path, 2)}")
                expression = f"{name}()"
            else:
                self.body.append(f"{name} = {self._call(node, path, 1)}")
                expression = name
            if node_id is None:
                return expression
            self.defined[node_id] = expression
        return self.defined[node_id]

    def _holds_factory(self, value: Any, path: str, depth: int = 0) -> bool:
        """config.holds_factory on the unresolved config: an interpolation is followed to what it names (a value
        still missing, `???`, is none), where resolving the subtree would stop at the missing value."""
        if isinstance(value, str) and (match := _REFERENCE.match(value)) and depth < 64:
            referenced = _absolute(match.group(1), path)
            try:
                target = self._lookup(referenced)
            except (KeyError, IndexError, ValueError, TypeError):
                return False
            return self._holds_factory(target, referenced, depth + 1)
        if isinstance(value, dict) and "_target_" not in value:
            return any(self._holds_factory(item, f"{path}.{key}", depth) for key, item in value.items())
        if isinstance(value, list):
            return any(self._holds_factory(item, f"{path}.{i}", depth) for i, item in enumerate(value))
        return holds_factory(value)

    def _call(self, node: dict, path: str, indent: int, forward: tuple[str, str] | None = None) -> str:
        """The call of `node`; `forward` (names of *args and **kwargs) makes a partial's body: the call with
        those passed on after its own arguments."""
        value = self._data if node.get("_meta_") else self.expr
        args = [value(arg, f"{path}._args_.{i}", indent + 1) for i, arg in enumerate(node.get("_args_", ()))]
        named = {
            key: value(item, f"{path}.{key}", indent + 1)
            for key, item in node.items()
            if key not in RESERVED_KEYS and not (key.startswith("_") and key.endswith("_"))
        }
        kwargs = [f"{key}={item}" for key, item in named.items()]
        spelled = all(map(_is_keyword_name, named))
        if node.get("_kwargs_") is not None or not spelled or forward:
            # One mapping: latent args, merged last, win over keywords of the same name, and a partial's caller over
            # both; and a keyword that is no Python name (`my-key`, `class`) can only be passed this way.
            entries = [f"{key!r}: {item}" for key, item in named.items()]
            if node.get("_kwargs_") is not None:
                entries.append("**" + self.expr(node["_kwargs_"], f"{path}._kwargs_", indent + 2))
            if forward:
                entries.append(f"**{forward[1]}")
            kwargs = ["**" + self._wrap("{", entries, "}", indent + 1)]
        target = node["_target_"]
        if forward:
            searchpath = self._value(f"{path}._searchpath_") if "_searchpath_" in node else None
            return self._wrap(f"{self._function(target, searchpath)}(", [*args, f"*{forward[0]}", *kwargs], ")", indent)
        literal = self._literal(target, node, args, kwargs)
        if literal is not None:
            return literal
        searchpath = self._value(f"{path}._searchpath_") if "_searchpath_" in node else None
        function = self._function(target, searchpath)
        if node.get("_partial_"):
            self.uses_partial = True
            return self._wrap(f"{self.partial}(", [function, *args, *kwargs], ")", indent)
        return self._wrap(f"{function}(", args + kwargs, ")", indent)

    def _literal(self, target: str, node: dict, args: list[str], kwargs: list[str]) -> str | None:
        """list/tuple/dict calls on one literal argument print as that literal."""
        if node.get("_partial_") or kwargs or len(args) != 1 or target not in ("list", "tuple", "dict"):
            return None
        raw = node["_args_"][0]
        if target == "dict" and isinstance(raw, dict) and "_target_" not in raw:
            return args[0]
        if target in ("list", "tuple") and isinstance(raw, list):
            return args[0] if target == "list" else f"tuple({args[0]})"
        return None

    def _value(self, path: str) -> Any:
        """The constructed value at `path` (e.g. a search path, shared as a `list` node)."""
        from forgather.graph.construct import construct

        return construct({"value": self._select(path)}, "value", self.base_dir)

    def _data(self, value: Any, path: str, indent: int) -> str:
        """A meta call's argument: its config as literal data, interpolations resolved."""
        return repr(self._select(path))

    def _select(self, path: str) -> Any:
        """The value at `path` as plain data, interpolations resolved. Walked here rather than by OmegaConf.select,
        which cannot pass a mapping key that is no string (`{0: ...}`): a part matches a key by its text."""
        node: Any = self.config
        for part in path.split("."):
            if OmegaConf.is_list(node):
                node = node[int(part)]
            else:
                keys = list(node.keys())
                node = node[part if part in keys else next(key for key in keys if str(key) == part)]
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    def _function(self, target: str, searchpath: list[str] | None = None) -> str:
        module, qualname = split_spec(target)
        path = module_file(module, self.base_dir) if module else None
        if path is None:
            return self._symbol(target)
        self.uses_files = True
        key = (path, qualname.split(".")[0], tuple(searchpath or ()))
        if key not in self.imports:
            self.imports[key] = self._fresh(qualname.split(".")[0])
        return self.imports[key] + "".join(f".{a}" for a in qualname.split(".")[1:])

    @staticmethod
    def _wrap(opening: str, items: list[str], closing: str, indent: int) -> str:
        one_line = opening + ", ".join(items) + closing
        if len(one_line) + 4 * indent <= _LINE_WIDTH and "\n" not in one_line:
            return one_line
        pad = "    " * (indent + 1)
        inner = "".join(f"\n{pad}{item}," for item in items)
        return f"{opening}{inner}\n{'    ' * indent}{closing}"

    # -- module -----------------------------------------------------------------------------------------

    def _top(self, key: str, indent: int) -> str:
        """A top-level value; one still missing (`tokenizer: !var tokenizer` without a value) is a parameter."""
        if self.raw[key] == "???":
            self.params.setdefault(key, "???")
            return self.param_names[key]
        return self.expr(self.raw[key], key, indent)

    def module(self, target: str | None, title: str, targets: list[str] | None = None) -> str:
        if target is None:
            keys = [key for key in (self.raw if targets is None else targets) if not str(key).startswith("_")]
            values = {key: self._top(key, 2) for key in keys}
            # A top-level value that became a parameter is returned as that parameter.
            items = [f"{key!r}: {self.param_names[key] if key in self.params else value}" for key, value in values.items()]
            result = self._wrap("{", items, "}", 1)
        else:
            result = self._top(target, 1)
        head = [f'"""{title}"""', ""]
        if self.uses_files:
            head.append("import os")
        if self.uses_partial:
            head.append("from functools import partial" + ("" if self.partial == "partial" else f" as {self.partial}"))
        for (module, name, _), symbol in sorted(self.imports.items()):
            if os.path.isabs(module):
                continue
            head.append(f"from {module} import {name}" + ("" if symbol == name else f" as {symbol}"))
        if self.uses_files:
            head.append(_FILE_LOADER)
            for (module, name, searchpath), symbol in sorted(self.imports.items()):
                if os.path.isabs(module):
                    where = f", {list(searchpath)!r}" if searchpath else ""
                    head.append(f"{symbol} = _load_file({module!r}{where}).{name.split('.')[0]}")
        required = [self.param_names[name] for name, value in self.params.items() if value == "???"]
        optional = [f"{self.param_names[name]}={value!r}" for name, value in self.params.items() if value != "???"]
        signature = ", ".join(required + optional)
        body = "".join(f"    {line}\n" for line in self.body)
        text = "\n".join(head)
        return f"{text.rstrip()}\n\n\ndef construct({signature}):\n{body}    return {result}\n"


def _arguments(node: dict, path: str) -> list[tuple[Any, str]]:
    """A call node's arguments (positional, keyword, latent) as config, with their paths."""
    named = [(item, f"{path}.{key}") for key, item in node.items()
             if key not in RESERVED_KEYS and not (key.startswith("_") and key.endswith("_"))]
    positional = [(arg, f"{path}._args_.{i}") for i, arg in enumerate(node.get("_args_", ()))]
    return [*positional, *named, (node.get("_kwargs_"), f"{path}._kwargs_")]


def generate_code(config: DictConfig, target: str | None = None, base_dir: str | None = None, title: str = "",
                  targets: list[str] | None = None) -> str:
    """Python source of a module with `construct()` building `target` (or a dict of all targets: the config's
    top-level keys, or `targets`, which leaves out a project's !var settings)."""
    if target is not None and target not in config.keys():
        from .construct import unknown_target

        raise KeyError(f"{target}: {unknown_target(target, config)}")
    title = title or f"Generated by Forgather: construct() builds {target or 'every target'} with plain imports."
    return _Generator(config, base_dir).module(target, title, targets)
