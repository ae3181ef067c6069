"""Import specs: the strings after a YAML tag's colon, and `_target_` values.

Forms (ARCHITECTURE.md, stage 2):
    builtin                     a name in `builtins` (`dict`, `list`, `print`), an attribute path from one
                                (`str.upper`, `dict.fromkeys`), or one of the reference Forgather's own bare
                                targets (`getitem`, `call` ...: REFERENCE_CALLABLES)
    module:Name                 `from module import Name`
    module.sub:Name.attr        attribute path after the colon
    /path/file.py:Name          a Python file loaded by path; a relative one (`./src/x.py:Name`) is found
                                from the project directory (a project's config anchors it there:
                                `anchored`), else from the current directory, as in the reference Forgather,
                                whose CLI works in the project directory
    .relative:Name              `relative.py` in the project's model source directory (`base_dir`)
    a.b.Name                    Hydra's dotted form: longest importable module prefix, then attributes

`import_spec` is the one place a spec becomes an object; every stage that resolves targets calls it.
"""

from __future__ import annotations

import builtins
import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from forgather.errors import UserError, did_you_mean


class ImportSpecError(UserError, ImportError):
    """A spec that names nothing importable; the message says which part failed and what to check."""


# Bare targets the reference Forgather resolves from its own table (see reference_callables.py), as the
# specs that name them here. A Python builtin of the same name would win; none has one.
_REFERENCE_MODULE = "forgather.graph.reference_callables"
REFERENCE_CALLABLES = {
    "getitem": "operator:getitem",
    "items": f"{_REFERENCE_MODULE}:items",
    "keys": f"{_REFERENCE_MODULE}:keys",
    "values": f"{_REFERENCE_MODULE}:values",
    "call": f"{_REFERENCE_MODULE}:call",
    "named_list": "builtins:list",
    "named_tuple": "builtins:tuple",
    "named_dict": "builtins:dict",
}


_FILE_MODULE_PREFIX = "forgather_local."  # sys.modules names of files loaded by path


def split_spec(spec: str) -> tuple[str, str]:
    """Split a spec into (module-or-path, qualname); module is '' for builtins and dotted Hydra specs."""
    if ":" not in spec and not hasattr(builtins, spec):
        spec = REFERENCE_CALLABLES.get(spec, spec)
    if ":" in spec:
        module, _, qualname = spec.rpartition(":")
        if not module or not qualname:
            raise ImportSpecError(f"import spec {spec!r} must look like 'module:Name' (both parts non-empty)")
        return module, qualname
    return "", spec


def anchored(spec: str, root: str) -> str:
    """`spec` with a relative file path (`./src/x.py:Name`, `x.py:Name`) made absolute from `root`; any other
    spec as it is."""
    module, qualname = split_spec(spec)
    if not module or not module.endswith(".py") or os.path.isabs(module):
        return spec
    return f"{os.path.normpath(os.path.join(root, module))}:{qualname}"


def module_file(module: str, base_dir: str | None = None) -> str | None:
    """The file path a file-like module part names (`/x.py`, `./x.py`, `.rel`), or None for a dotted module.
    Only `.rel` is found in `base_dir`; a path is taken from the current directory."""
    if module.endswith(".py") or module.startswith("/"):
        return os.path.abspath(module)
    if module.startswith("."):
        if base_dir is None:
            raise ImportSpecError(
                f"relative import spec {module!r} needs a model source directory; "
                "set it in the project (meta.yaml: model_src) or use an absolute module path"
            )
        return os.path.join(os.path.abspath(base_dir), *module.lstrip(".").split(".")) + ".py"
    return None


def load_file_module(path: str, searchpath: list[str] | None = None) -> ModuleType:
    """Import a Python file by path once; the module gets a stable, path-derived name in sys.modules.

    With `searchpath` (the reference Forgather's submodule_searchpath) the module is loaded as a package
    whose submodules live in those directories, so that `from .layers import X` in it finds layers.py there.
    """
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    key = "\0".join([path, *(searchpath or [])])
    name = f"{_FILE_MODULE_PREFIX}{stem}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(path):
        raise ImportSpecError(f"no Python file at {path}")
    locations = [os.path.abspath(p) for p in searchpath] if searchpath else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Let the file import its siblings (a project's model source directory is a flat set of modules).
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.append(directory)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(module: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        close = _close_module(error.name)
        if (error.name or "").startswith("forgather.") and not close:
            # Our package owns the name; a submodule it lacks is one of the reference Forgather's.
            what = "the reference Forgather's library (its trainers, losses, dataset and model builders)" \
                if error.name.startswith("forgather.ml") else "a module of the reference Forgather"
            raise ImportSpecError(
                f"cannot import {spec!r}: {error.name!r} is {what}, which this Forgather does not include; keep the "
                f"template and build this part from our library (docs/guides/coming_from_forgather.md, 'What maps "
                f"to Lightning')") from error
        hint = close or (f" (is the package that provides {error.name!r} installed?)" if error.name else "")
        raise ImportSpecError(f"cannot import module {module!r} for {spec!r}: {error}{hint}") from error


def _close_module(name: str | None) -> str:
    """"; did you mean 'torch.nn'?" for a misspelled submodule of a package that imports; else ""."""
    import pkgutil

    parent, _, leaf = (name or "").rpartition(".")
    if not parent:
        return ""
    try:
        package = importlib.import_module(parent)
    except ImportError:
        return ""
    names = [info.name for info in pkgutil.iter_modules(getattr(package, "__path__", []))]
    hint = did_you_mean(leaf, names, n=2, cutoff=0.7, show=lambda c: repr(f"{parent}.{c}"))
    return f"; {hint}" if hint else ""


def _getattr_path(obj: Any, qualname: str, spec: str) -> Any:
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = getattr(obj, "__name__", type(obj).__name__)
            if isinstance(obj, ModuleType) and getattr(obj, "__file__", None) and where.startswith(_FILE_MODULE_PREFIX):
                where = obj.__file__  # a file loaded by path: its module name is ours, its path the user's
            raise ImportSpecError(f"{spec!r}: {where!r} has no attribute {part!r}{hint}") from None
    return obj


def _import_dotted(spec: str) -> Any:
    if "." not in spec:
        if hasattr(builtins, spec):
            return getattr(builtins, spec)
        raise ImportSpecError(f"{spec!r} is not a builtin; write 'module:{spec}' to import it from a module")
    parts = spec.split(".")
    if hasattr(builtins, parts[0]):  # `str.upper`, `dict.fromkeys`: a builtin's attribute, as the reference reads it
        return _getattr_path(builtins, spec, spec)
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name and module.startswith(error.name):
                continue
            raise
        return _getattr_path(found, ".".join(parts[cut:]), spec)
    raise ImportSpecError(f"cannot import any module prefix of {spec!r}")


def import_spec(spec: str, base_dir: str | None = None, searchpath: list[str] | None = None) -> Any:
    """Resolve a spec to the object it names. `base_dir` anchors `.relative` specs;
    `searchpath` lists where a file module finds its relative imports (see `load_file_module`)."""
    module, qualname = split_spec(spec)
    if not module:
        return _import_dotted(qualname)
    path = module_file(module, base_dir)
    found = load_file_module(path, searchpath) if path is not None else _import_module(module, spec)
    return _getattr_path(found, qualname, spec)
