"""Globals every template can call: time stamps, path helpers, the user's directories, the host and the
versions of the main libraries. These are the reference Forgather's template globals (its templates use
them unchanged); the project adds `project_dir` and `workspace_root` (see `forgather.project`).

The path helpers fail on an undefined argument with Jinja's "'x' is undefined" error, naming the variable,
instead of a TypeError from os.path. `versions` is read from package metadata: no library is imported.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
from importlib import metadata
from typing import Any, Callable

import jinja2
import platformdirs

_APP = "forgather"
_VERSIONED = ("torch", "transformers", "accelerate")


def isotime() -> str:
    """Local time, ISO format, 1-second resolution."""
    return datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")


def utcisotime() -> str:
    """UTC time, ISO format, 1-second resolution, with its offset: `2026-12-04T10:00:00+00:00`."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def filetime() -> str:
    """Local time in a form that can be part of a file name."""
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def utcfiletime() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")


def _defined(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, failing with Jinja's undefined-variable error when an argument is undefined."""

    @functools.wraps(function)
    def checked(*args: Any) -> Any:
        for arg in args:
            if isinstance(arg, jinja2.Undefined):
                arg._fail_with_undefined_error()
        return function(*args)

    return checked


def modname_from_path(path: str) -> str:
    """The module name of a Python file: `/a/b/model.py` -> `model`."""
    return os.path.splitext(os.path.basename(path))[0]


class TemplateRaise(ValueError):
    """What a template's `raise("...")` or failed `assert(condition, "...")` raises; the renderer names the
    template and line it came from."""


def template_raise(message: str) -> None:
    """`== raise("stages must divide the batch")`: stop rendering with the template's own message."""
    raise TemplateRaise(str(message))


def template_assert(condition: Any, message: str = "assertion failed") -> str:
    """`== assert(n % stages == 0, "stages must divide the batch")`; renders as nothing when it holds."""
    if not condition:
        template_raise(message)
    return ""


def forgather_config_dir() -> str:
    """The user's Forgather configuration directory (~/.config/forgather on Linux)."""
    return platformdirs.user_config_dir(_APP)


def versions() -> dict[str, str]:
    """Python's version and those of the installed libraries among torch, transformers, accelerate."""
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


GLOBALS = {
    "isotime": isotime,
    "utcisotime": utcisotime,
    "filetime": filetime,
    "utcfiletime": utcfiletime,
    "now": datetime.datetime.now,
    "utcnow": lambda: datetime.datetime.now(datetime.timezone.utc),
    "joinpath": _defined(os.path.join),
    "normpath": _defined(os.path.normpath),
    "abspath": _defined(os.path.abspath),
    "relpath": _defined(os.path.relpath),
    "dirname": _defined(os.path.dirname),
    "basename": _defined(os.path.basename),
    "splitext": _defined(os.path.splitext),
    "modname_from_path": _defined(modname_from_path),
    "getcwd": os.getcwd,
    "getenv": os.environ.get,
    "raise": template_raise,
    "assert": template_assert,
    "repr": repr,
    "user_home_dir": lambda: os.path.expanduser("~"),
    # platformdirs' own functions, as the reference passes them: `user_cache_dir()` is ~/.cache on Linux,
    # `user_cache_dir("forgather")` ~/.cache/forgather.
    "user_cache_dir": platformdirs.user_cache_dir,
    "user_config_dir": platformdirs.user_config_dir,
    "user_data_dir": platformdirs.user_data_dir,
    "site_config_dir": platformdirs.site_config_dir,
    "site_data_dir": platformdirs.site_data_dir,
    "forgather_config_dir": forgather_config_dir,
    "hostname": platform.node(),
    "uname": platform.uname(),
    "versions": versions(),
}
